"""Plot the end-to-end GPU speed run: Mesa / FLASH_ATTN ratios against prompt length, with
the issue's targets.

    python benchmarks/plot_gpu_speed.py [benchmarks/gpu/speed-2026-11-30-5a1b989-a.json]
        [--floor JSON] [-o PNG]

Reads the JSON that ``bench_gpu_e2e.py --parts speed`` writes (``speed`` -> backend ->
``"<length>": [prefill s, decode ms/token]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the targets: prompt length -> (prefill ratio, decode ratio)
TARGETS = {4096: (1.10, 1.10), 32768: (0.60, 1.10), 131072: (0.35, 1.10)}


def ratios(speed: dict) -> tuple[list[int], list[float], list[float]]:
    """Prompt lengths and Mesa / FLASH_ATTN ratios of prefill seconds and decode ms/token."""
    fa, mesa = speed["FLASH_ATTN"], speed["mesa"]
    lengths = sorted(int(k) for k in fa if k.isdigit() and k in mesa)
    pre = [mesa[str(n)][0] / fa[str(n)][0] for n in lengths]
    dec = [mesa[str(n)][1] / fa[str(n)][1] for n in lengths]
    return lengths, pre, dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "json", nargs="?", default=str(HERE / "gpu" / "speed-2026-11-30-5a1b989-a.json")
    )
    ap.add_argument(
        "--floor",
        default=str(HERE / "prefill_floor_h200.json"),
        help="prefill_floor.py output: draw the GEMM floor (if the file exists)",
    )
    ap.add_argument("-o", "--output", default=str(HERE / "gpu_speed_h200.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    lengths, pre, dec = ratios(data["speed"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, values, which, col in (
        (axes[0], pre, "prefill s", 0),
        (axes[1], dec, "decode ms/token", 1),
    ):
        ax.plot(lengths, values, "o-", label="Mesa / FLASH_ATTN (measured)")
        ax.plot(lengths, [TARGETS.get(n, (None, None))[col] for n in lengths], "k_", ms=18,
                mew=2, label="issue #5 target (at most)")  # fmt: skip
        for n, v in zip(lengths, values, strict=True):
            ax.annotate(f"{v:.2f}x", (n, v), textcoords="offset points", xytext=(6, 6))
        if col == 0 and Path(args.floor).exists():
            gemm = {r["T"]: r["gemm_s"] for r in json.loads(Path(args.floor).read_text())["rows"]}
            fa = data["speed"]["FLASH_ATTN"]
            ns = [n for n in lengths if n in gemm]
            ax.plot(ns, [gemm[n] / fa[str(n)][0] for n in ns], "s--", color="grey",
                    label="7B projection GEMMs alone / FLASH_ATTN (floor)")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.set_xlabel("prompt tokens (L = 4k)")
        ax.set_ylabel(f"ratio of {which}")
        ax.set_ylim(0, max(1.6, max(values) * 1.15))
        ax.set_title(f"{which}: Mesa / FLASH_ATTN")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(
        f"Llama-2-7B shape, dummy bf16, H200, vLLM 0.26.0, default mode ({Path(args.json).name})"
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
