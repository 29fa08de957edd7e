"""``mesa-vllm demo`` end to end: two real servers (Mesa, then stock with the RoPE table
forced past its end) answer the same passkey prompt past the trained length.  Run on the
bundled 256-token passkey model at 4x L, so it takes a minute and a half; ``make demo``
runs the same code on the real model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mesa_vllm.testing.cases import PASSKEY_MODEL_MESA

pytestmark = pytest.mark.e2e

MODEL = Path(__file__).resolve().parents[2] / "mesa_vllm" / "assets" / "models" / "passkey-llama"


def test_demo_shows_mesa_finding_the_key_where_stock_does_not(tmp_path):
    exe = Path(sys.executable).parent / "mesa-vllm"
    argv = [
        str(exe), "demo", "--model", str(MODEL), "--multiple", "4",
        "--mesa-config", json.dumps(PASSKEY_MODEL_MESA), "--log-dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    m = re.search(r"prompt: (\d+) tokens = ([\d.]+)x the trained length", out)
    assert m and 3.9 <= float(m.group(2)) <= 4.0 and int(m.group(1)) > 256, out
    assert "[mesa] answer:" in out and "-> FOUND the key" in out.split("[stock]")[0], out
    assert "[stock] answer:" in out and "missed the key" in out.split("[stock]")[-1], out
    assert (tmp_path / "mesa-demo-mesa.log").stat().st_size > 0
