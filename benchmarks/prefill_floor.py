"""What a 7B prefill costs without attention: the GEMM floor under the prefill targets.

    python benchmarks/prefill_floor.py [--lengths 4096,32768,131072] [--step 16384] [--out DIR]

Llama-2-7B shape, bf16, on the GPU: the four projection GEMMs of one layer (qkv 4096->12288,
o 4096->4096, gate_up 4096->22016, down 11008->4096) timed on a step of ``--step`` tokens
(the speed benchmark's max_num_batched_tokens), times 32 layers, times the number of steps
of a T-token prompt.  Norms, activations, embeddings and the sampler are left out, so this
is a LOWER bound on any backend's prefill.  With vLLM's FlashAttention present it also times
FA3's causal attention of the same steps (step i: --step queries over (i + 1) * --step keys,
bottom-right causal), 32 layers: GEMM + FA3 attention approximates stock prefill.
Prints a Markdown table; writes prefill_floor.json to --out (or $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, HEAD_DIM, LAYERS = 4096, 11008, 32, 128, 32
GEMMS = {  # name: (in, out)
    "qkv": (HIDDEN, 3 * HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTER),
    "down": (INTER, HIDDEN),
}


def time_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def layer_gemm_ms(tokens: int) -> dict[str, float]:
    """ms of each projection GEMM of one layer on ``tokens`` rows (bf16, weights random)."""
    out = {}
    for name, (k, n) in GEMMS.items():
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        out[name] = time_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        del x, w
    return out


def fa3_step_ms(q_len: int, k_len: int) -> float | None:
    """ms of one layer's FA3 causal attention: q_len queries over k_len keys, or None."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - vLLM not staged
        return None
    q = torch.randn(q_len, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(k_len, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cq = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    ck = torch.tensor([0, k_len], dtype=torch.int32, device="cuda")
    return time_ms(
        lambda: flash_attn_varlen_func(q, k, v, q_len, cq, k_len, ck, causal=True, fa_version=3),
        reps=5,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--step", type=int, default=16384)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows, per_tokens = [], {}
    print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    for T in lengths:
        steps = [(s, min(args.step, T - s)) for s in range(0, T, args.step)]
        gemm_s = fa_s = 0.0
        for start, n in steps:
            if n not in per_tokens:
                per_tokens[n] = layer_gemm_ms(n)
                print(f"one layer, {n} tokens: {per_tokens[n]}", flush=True)
            gemm_s += sum(per_tokens[n].values()) * LAYERS / 1e3
            ms = fa3_step_ms(n, start + n)
            fa_s = None if ms is None or fa_s is None else fa_s + ms * LAYERS / 1e3
        flops = 2.0 * T * sum(k * n for k, n in GEMMS.values()) * LAYERS
        rows.append(
            dict(T=T, steps=len(steps), gemm_s=gemm_s, gemm_tflops=flops / gemm_s / 1e12,
                 fa3_attention_s=fa_s)
        )  # fmt: skip
        print(rows[-1], flush=True)
    lines = [
        f"7B-shape prefill floor, bf16, {args.step}-token steps, 32 layers "
        f"({torch.cuda.get_device_name()}): projection GEMMs only (a lower bound), and FA3 "
        "causal attention of the same steps.",
        "",
        "| T | steps | GEMM s | GEMM TFLOP/s | FA3 attention s | GEMM + FA3 s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        fa = r["fa3_attention_s"]
        fa_cells = f"{fa:.3f} | {r['gemm_s'] + fa:.3f}" if fa is not None else "- | -"
        lines.append(
            f"| {r['T']} | {r['steps']} | {r['gemm_s']:.3f} | {r['gemm_tflops']:.0f} | {fa_cells} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_floor.json").write_text(json.dumps(dict(rows=rows, table=table), indent=1))


if __name__ == "__main__":
    main()
