"""Where a decode step's time goes: torch.profiler over decode steps of a Llama-2-7B-shape
engine (dummy bf16 weights) at one prompt length, for one backend per process.

    python benchmarks/profile_decode.py [--backends mesa,FLASH_ATTN] [--length 32768]

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler sees the
scheduler, the metadata builder and every kernel.  Prints, per backend, ms/token and the top
ops by GPU time and by CPU time; writes the tables to --out.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def one(backend: str, length: int, steps: int, out: Path) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from bench_gpu_e2e import llama7b_engine_kwargs
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    kw = llama7b_engine_kwargs(backend, length + 2 * steps + 64, Path("/tmp/mesa-gpu-bench"))
    llm = LLM(**kw)
    prompt = {"prompt_token_ids": [random.Random(1).randrange(3, 31000) for _ in range(length)]}
    one_tok = SamplingParams(max_tokens=1, ignore_eos=True)
    many = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
    for sp in (one_tok, many):  # warm-up: JIT, graphs
        llm.generate([prompt], sp, use_tqdm=False)
    t = time.perf_counter()
    llm.generate([prompt], one_tok, use_tqdm=False)
    pre = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([prompt], many, use_tqdm=False)
    per_tok = (time.perf_counter() - t - pre) / steps * 1000
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], many, use_tqdm=False)
    torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = ka.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)
    cpu = ka.table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60)
    text = (
        f"## {backend} at T={length}: prefill {pre:.3f} s, decode {per_tok:.2f} ms/token "
        f"(profiled: 1 prefill + {steps} decode steps)\n\n### by GPU time\n```\n{gpu}\n```\n"
        f"### by CPU time\n```\n{cpu}\n```\n"
    )
    (out / f"profile-{backend}.md").write_text(text)
    print(text, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backends", default="mesa,FLASH_ATTN")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        one(args.one, args.length, args.steps, args.out)
        return 0
    rc = 0
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--one", backend, "--length", str(args.length),
               "--steps", str(args.steps), "--out", str(args.out)]  # fmt: skip
        rc |= subprocess.run(cmd, timeout=280).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
