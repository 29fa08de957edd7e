"""CPU prefill time vs prompt length: Mesa vs the stock CPU backend, same run, same model.

    .venv/bin/python benchmarks/bench_cpu_prefill.py [--train-len 256] [--multiples 1,2,...]

A seeded random-weight Llama (hidden 256, 4 layers, 8 heads of 32) with training length L.
Stock runs with its RoPE table raised (--hf-overrides max_position_embeddings) so it computes
(extrapolated) attention rather than indexing past the table.  Each point: best of 3
``LLM.generate(max_tokens=1)`` calls (prefill + one sampled token), prefix caching off.
Writes benchmarks/cpu_prefill.md (table) and benchmarks/cpu_prefill.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _engine(model: Path, mesa: bool, max_len: int, train_len: int):
    from vllm import LLM

    kw = dict(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_len,
        gpu_memory_utilization=0.2,
        enable_prefix_caching=False,
        seed=0,
        max_num_batched_tokens=max_len,
        max_num_seqs=1,
    )
    if mesa:
        kw.update(
            attention_backend="mesa",
            additional_config={"mesa": {"first_chunk": 32, "last_chunk": 128, "stair_width": 100}},
        )
        kw.pop("enable_prefix_caching")
    else:
        kw["hf_overrides"] = {"max_position_embeddings": max_len}
    return LLM(**kw)


def _time_prefill(llm, n: int, reps: int = 3) -> float:
    from vllm import SamplingParams

    rng = random.Random(n)
    prompt = {"prompt_token_ids": [0] + [rng.randrange(3, 450) for _ in range(n - 1)]}
    sp = SamplingParams(temperature=0, max_tokens=1)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        llm.generate([prompt], sp, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--multiples", default="0.5,1,2,4,8,16,32")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from mesa_vllm.testing.tiny_models import make_random_model

    L = args.train_len
    model = make_random_model(
        "llama",
        Path.home() / ".cache" / "mesa_vllm" / f"bench-llama-{L}",
        train_len=L,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    mults = [float(x) for x in args.multiples.split(",")]
    lengths = [int(m * L) for m in mults]
    max_len = max(lengths) + 16
    results: dict[str, dict[int, float]] = {}
    for method in ("stock", "mesa"):
        print(f"[{method}] starting engine ...", flush=True)
        llm = _engine(model, method == "mesa", max_len, L)
        results[method] = {}
        for n in lengths:
            results[method][n] = _time_prefill(llm, n)
            print(f"[{method}] T={n:6d}  prefill {results[method][n] * 1000:8.1f} ms", flush=True)
        del llm
    rows = ["| T | T/L | stock ms | mesa ms | mesa ms per 1k tokens |", "|---|---|---|---|---|"]
    for n in lengths:
        s, m = results["stock"][n] * 1000, results["mesa"][n] * 1000
        rows.append(f"| {n} | {n / L:g} | {s:.1f} | {m:.1f} | {m / n * 1000:.1f} |")
    table = "\n".join(rows)
    cmd = "python " + " ".join(sys.argv)
    (args.out / "cpu_prefill.md").write_text(
        f"# CPU prefill time vs prompt length\n\nCommand: `{cmd}`  \n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model: random Llama "
        f"(hidden 256, 4 layers, 8x32 heads), L={L}; 2-core CPU.\n\n{table}\n"
    )
    (args.out / "cpu_prefill.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method, pts in results.items():
            ax.plot(list(pts), [v * 1000 for v in pts.values()], marker="o", label=method)
        ax.axvline(L, color="grey", ls=":", label="training length")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill ms (best of 3)")
        ax.set_title("CPU prefill: Mesa vs stock attention")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "cpu_prefill.png", dpi=110)
    except ImportError:
        pass
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
