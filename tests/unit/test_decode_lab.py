"""benchmarks/decode_lab.py under the Triton interpreter: its exact copy of the decode loop
(MODE 0) still launches against the production kernel's signatures and matches
``mesa_decode``; MODE 1 (no trig, wrong by design) does not, so the comparison can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import torch
import bench_kernels as bk
bk.DEV = "cpu"
import decode_lab as dl
from mesa_vllm.plan import MesaParams

# L = 64: a 600-token context is ~9 L, nearly all stair keys below the anchor
params = MesaParams(train_len=64, first_chunk=8, last_chunk=16, max_remainder=8, stair_width=5)
pb = bk.speed_problem(600, 599, 32, 2, 16, params, 1, seed=int(sys.argv[1]))
ref = torch.empty_like(pb["query"])
bk.run(pb, 4, out=ref)
diffs = {}
for mode in (0, 1):
    out = torch.full_like(ref, float("nan"))
    dl.lab_decode(pb, out, 4, mode, False, 16, 4, 1)
    diffs[mode] = float((out.float() - ref.float()).abs().max())
print(json.dumps(dict(diffs=diffs, ref_max=float(ref.float().abs().max()))))
"""


def test_lab_copy_matches_the_production_kernel():
    seed = int.from_bytes(os.urandom(3), "little")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(seed)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    diffs, ref_max = got["diffs"], got["ref_max"]
    assert ref_max > 0.05, got  # outputs of a softmax over random values, not zeros
    assert diffs["0"] <= 0.02, (seed, got)  # bf16 (tolerance of the kernel checks: 0.06)
    assert diffs["1"] > 0.02, (seed, got)  # keys turned by a fixed table: visibly wrong
