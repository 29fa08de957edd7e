"""Where a decode step's time goes: torch.profiler over decode steps of a Llama-2-7B-shape
engine (dummy bf16 weights) or of a real model, at one prompt length and batch size, for one
backend per process.

    python benchmarks/profile_decode.py [--backends mesa,FLASH_ATTN] [--length 32768]
        [--batch 1] [--model PATH]

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler sees the
scheduler, the metadata builder and every kernel; CUDA graphs and torch.compile on, as
served.  ``--batch B`` decodes B sequences of ``--length`` tokens together (different random
prompts).  Prints, per backend, ms per decode step, the GPU time per step (the kernels' sum:
a step whose wall time is well above it is bound by the host) and the top ops by GPU time
and by CPU time; writes the tables to --out (profile-<backend>-b<B>.md).
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


def engine_kwargs(backend: str, model: str | None, max_len: int, batch: int) -> dict:
    """LLM(...) arguments: the 7B shape of the speed runs, or ``model`` (a real checkpoint)."""
    from bench_gpu_e2e import llama7b_engine_kwargs

    if model is None:
        kw = llama7b_engine_kwargs(backend, max_len, Path("/tmp/mesa-gpu-bench"))
    else:
        kw = dict(model=model, dtype="bfloat16", max_model_len=max_len,
                  gpu_memory_utilization=0.5, attention_backend=backend)  # fmt: skip
        if backend != "mesa":
            kw["enable_prefix_caching"] = False
    kw["max_num_seqs"] = max(batch, 1)
    return kw


def gpu_us(ka) -> float:
    """Sum of the profiled kernels' device time, microseconds."""
    return sum(getattr(e, "self_device_time_total", 0.0) for e in ka)


def one(backend: str, length: int, steps: int, batch: int, model: str | None, out: Path):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(backend, model, length + 2 * steps + 64, batch))
    prompts = [
        {"prompt_token_ids": [random.Random(b + 1).randrange(3, 31000) for _ in range(length)]}
        for b in range(batch)
    ]
    one_tok = SamplingParams(max_tokens=1, ignore_eos=True)
    many = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
    for sp in (one_tok, many):  # warm-up: JIT, graphs
        llm.generate(prompts, sp, use_tqdm=False)
    t = time.perf_counter()
    llm.generate(prompts, one_tok, use_tqdm=False)
    pre = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(prompts, many, use_tqdm=False)
    per_tok = (time.perf_counter() - t - pre) / steps * 1000
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, many, use_tqdm=False)
    torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu_step = (gpu_us(ka) - pre * 1e6) / 1000 / steps  # the prefill's time, roughly, taken off
    gpu = ka.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)
    cpu = ka.table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60)
    name = "7B shape" if model is None else Path(model).name
    text = (
        f"## {backend}, {name}, batch {batch} at T={length}: prefill {pre:.3f} s, decode "
        f"{per_tok:.2f} ms/step, kernels ~{gpu_step:.2f} ms/step (profiled: 1 prefill + "
        f"{steps} decode steps)\n\n### by GPU time\n```\n{gpu}\n```\n"
        f"### by CPU time\n```\n{cpu}\n```\n"
    )
    (out / f"profile-{backend}-b{batch}.md").write_text(text)
    print(text, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backends", default="mesa,FLASH_ATTN")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", help="a real checkpoint (default: the 7B shape, dummy weights)")
    ap.add_argument("--timeout", type=int, default=280, help="seconds per backend")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        one(args.one, args.length, args.steps, args.batch, args.model, args.out)
        return 0
    rc = 0
    for backend in args.backends.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            backend,
            "--length",
            str(args.length),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--out",
            str(args.out),
        ]
        cmd += ["--model", args.model] if args.model else []
        rc |= subprocess.run(cmd, timeout=args.timeout).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
