"""Middle chunks through FlashAttention (``MESA_VLLM_MIDDLE_FA``): exactness against the dense
reference and the Triton prefill kernel, and the per-layer time before and after, on a GPU.

    python3 benchmarks/middle_fa.py [--lengths 16384,32768,131072] [--shapes 7b,smollm2]
        [--seed 0] [--out DIR]

1. **Dense reference.** Random paged batches (``mesa_vllm.testing.paged``): 3 requests of
   2-5 L (L = 64, F / Lc / Mmax / E = 8 / 24 / 10 / 4), each step cut at a random point, both
   chunk plans (fixed with ``middle_chunk`` 16), GQA groups 1 / 3 / 4 / 8, head dims 64 / 128,
   bf16.  The middle rows of the FlashAttention path (``mesa_vllm.attention.middle_fa``:
   keys gathered from the cache, vLLM's rotary kernel, ``flash_attn_varlen_func``) against
   ``mesa_attention_reference``, with the kernels' bf16 tolerance (max abs 5e-2, relative L2
   1.5e-2; docs/CONTRACT.md).
2. **Speed.** One prefill step holding a whole prompt of T tokens, the paper's plan, bf16,
   the Llama-2-7B shape (32 x 128, MHA) and SmolLM2's (9 query / 3 KV heads x 64): the
   Triton prefill kernel on every segment ("before") against the Triton kernel on the first
   and last chunks plus the FlashAttention path on the middle chunks ("after"), ms per layer
   (``triton.testing.do_bench``, median), the middle chunks alone both ways, and FA3 causal
   over the same T tokens for scale (MHA only).  The two outputs are compared with the same
   tolerance.

Without CUDA it is a dry run: part 1 runs with the torch stand-ins (``rotate``,
``varlen_causal_attention``) in fp32 (max abs 1e-4, relative L2 1e-5) and part 2 is
skipped.  Prints a Markdown table; writes OUT/middle_fa.json (OUT: --out, else $OUT, else
out/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mesa_vllm.attention.middle_fa import (  # noqa: E402
    cos_sin_table,
    flash_attend,
    middle_attention,
    middle_prefill,
    take_middle,
    varlen_causal_attention,
    vllm_rotary,
)
from mesa_vllm.ops.rope import RopeSpec, rotate  # noqa: E402
from mesa_vllm.plan import MesaParams, plan_request  # noqa: E402
from mesa_vllm.testing.paged import random_paged_batch, reference_rows  # noqa: E402
from mesa_vllm.testing.reference import rope_inv_freq  # noqa: E402

ROPE = {"rope_type": "default", "rope_theta": 10000.0}
PAGE = 16
TOL = {torch.bfloat16: (5e-2, 1.5e-2), torch.float32: (1e-4, 1e-5)}  # max abs, rel L2
SHAPES = {"7b": (32, 32, 128, 4096), "smollm2": (9, 3, 64, 8192)}  # Hq, Hkv, D, L


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    d = (got.float() - want.float()).flatten()
    return float(d.abs().max()), float(d.norm() / want.float().norm().clamp_min(1e-30))


def pieces(gpu: bool, D: int, dtype: torch.dtype, device):
    """(rotate, attend) of the path under test: vLLM's on a GPU, the torch stand-ins else."""
    inv = rope_inv_freq(D, ROPE).to(device)
    if gpu:
        return vllm_rotary(cos_sin_table(inv, 1 << 17, dtype), D), flash_attend
    spec = RopeSpec(inv, D, D)
    return (lambda x, p: rotate(x, p, spec)), varlen_causal_attention


def check(seed: int, G: int, D: int, split: str, gpu: bool) -> dict:
    L, F, Lc, Mmax, E = 64, 8, 24, 10, 4
    width = 16 if split == "fixed" else None
    params = MesaParams(train_len=L, first_chunk=F, last_chunk=Lc, max_remainder=Mmax,
                        stair_width=E, split=split, middle_chunk=width)  # fmt: skip
    dtype = torch.bfloat16 if gpu else torch.float32
    device = "cuda" if gpu else "cpu"
    Hkv = 2
    rng = random.Random(seed)
    mids = []
    while not mids:  # steps drawn until one holds middle rows
        reqs = []
        for _ in range(3):
            T = rng.randrange(2 * L, 5 * L)
            ctx = rng.randrange(0, T - 1)
            reqs.append((T, rng.randrange(ctx + 1, T + 1), ctx))
        batch = random_paged_batch(reqs, params, Hkv, G, D, PAGE, dtype,
                                   torch.Generator().manual_seed(seed), 3)  # fmt: skip
        mids, _ = take_middle(batch.entries)
    row = dict(seed=seed, G=G, D=D, split=split, dtype=str(dtype).split(".")[-1])
    mp = middle_prefill(mids, batch.block_table.to(device), PAGE, 3 if gpu else None, device)
    kc, vc = (c.to(device).view(-1, Hkv, D) for c in (batch.key_cache, batch.value_cache))
    rot, attend = pieces(gpu, D, dtype, device)
    out = middle_attention(batch.query.to(device), kc, vc, mp, D**-0.5, rot, attend).cpu()
    want = reference_rows(batch, reqs, params, mp.rows.tolist(), ROPE)
    max_abs, rel = errors(out, want)
    tol = TOL[dtype]
    ok = max_abs <= tol[0] and rel <= tol[1]
    return dict(row, rows=len(mp.rows), max_abs=max_abs, rel_l2=rel, ok=ok,
                status="ok" if ok else "FAIL")  # fmt: skip


def speed(T: int, shape: str, fa_varlen) -> dict:
    import bench_kernels as bk

    from mesa_vllm.ops.triton import table as tm
    from mesa_vllm.ops.triton.prefill import mesa_prefill

    Hq, Hkv, D, L = SHAPES[shape]
    params = MesaParams(train_len=L)
    torch.manual_seed(T)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    n_blocks = -(-T // PAGE)
    kc = torch.randn(n_blocks, PAGE, Hkv, D, **kw)
    vc = torch.randn_like(kc)
    query = torch.randn(T, Hq, D, **kw)
    bt = torch.randperm(n_blocks, device="cuda").to(torch.int32)[None]
    entries = [(0, s.q_start, s) for s in plan_request(T, 0, T, params)]
    mids, rest = take_middle(entries)
    bq = tm.default_block_q(Hq // Hkv)
    table = {name: tm.build_segment_table(e, params, bq, "cuda")
             for name, e in (("all", entries), ("rest", rest), ("mid", mids))}  # fmt: skip
    mp = middle_prefill(mids, bt, PAGE, 3, "cuda")
    inv = rope_inv_freq(D, ROPE).cuda()
    rot = vllm_rotary(cos_sin_table(inv, max(mp.max_k, 4096), torch.bfloat16), D)
    flat = (kc.view(-1, Hkv, D), vc.view(-1, Hkv, D))
    scale = D**-0.5
    before, after = torch.empty_like(query), torch.empty_like(query)

    def triton(name, out):
        mesa_prefill(query, kc, vc, bt, table[name], inv, scale, out)

    def fa_middle(out):
        res = middle_attention(query, *flat, mp, scale, rot, flash_attend)
        out.index_copy_(0, mp.rows, res)

    def run_after():
        triton("rest", after)
        fa_middle(after)

    triton("all", before)
    run_after()
    max_abs, rel = errors(after, before)
    tol = TOL[torch.bfloat16]
    row = dict(
        shape=shape, T=T, middle_rows=len(mp.rows), middle_chunks=len(mids),
        before_ms=bk.bench_ms(lambda: triton("all", before)),
        after_ms=bk.bench_ms(run_after),
        middle_triton_ms=bk.bench_ms(lambda: triton("mid", before)),
        middle_fa_ms=bk.bench_ms(lambda: fa_middle(after)),
        max_abs=max_abs, rel_l2=rel, ok=max_abs <= tol[0] and rel <= tol[1],
    )  # fmt: skip
    if Hq == Hkv and fa_varlen is not None:
        row["fa3_causal_ms"] = bk.bench_ms(bk.baseline_prefill(fa_varlen, T, Hq, D))
    log(f"speed {row}")
    return row


def markdown(checks: list[dict], speeds: list[dict], header: str) -> str:
    lines = [header, "", "| G | D | split | dtype | middle rows | max abs | rel L2 | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in checks:
        lines.append(f"| {c['G']} | {c['D']} | {c['split']} | {c['dtype']} | {c['rows']} | "
                     f"{c['max_abs']:.2e} | {c['rel_l2']:.2e} | {c['status']} |")  # fmt: skip
    if speeds:
        lines += ["", "| shape | T | middle chunks | before ms | after ms | after / before | "
                  "middle: Triton ms | middle: FA ms | FA3 causal ms | max abs | rel L2 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in speeds:
            fa3 = f"{s['fa3_causal_ms']:.3f}" if "fa3_causal_ms" in s else "-"
            lines.append(
                f"| {s['shape']} | {s['T']} | {s['middle_chunks']} | {s['before_ms']:.3f} | "
                f"{s['after_ms']:.3f} | {s['after_ms'] / s['before_ms']:.3f}x | "
                f"{s['middle_triton_ms']:.3f} | {s['middle_fa_ms']:.3f} | {fa3} | "
                f"{s['max_abs']:.2e} | {s['rel_l2']:.2e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="16384,32768,131072")
    ap.add_argument("--shapes", default="7b,smollm2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    t0 = time.time()
    checks = []
    for i, (G, D, split) in enumerate(
        [(g, d, s) for s in ("dynamic", "fixed") for g in (1, 3, 4, 8) for d in (64, 128)]
    ):
        checks.append(check(a.seed + i, G, D, split, gpu))
        log(f"check {checks[-1]}")
    speeds = []
    if gpu:
        import bench_kernels as bk

        _, fa_varlen = bk.baselines()
        for shape in a.shapes.split(","):
            for T in (int(x) for x in a.lengths.split(",")):
                speeds.append(speed(T, shape, fa_varlen))
    device = torch.cuda.get_device_name() if gpu else "CPU (dry run: torch stand-ins)"
    args = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"{time.strftime('%Y-%m-%d')}, {device}, `python3 benchmarks/middle_fa.py "
              f"{args}` ({time.time() - t0:.0f} s)")  # fmt: skip
    table = markdown(checks, speeds, header)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "middle_fa.json").write_text(json.dumps(dict(checks=checks, speed=speeds), indent=1))
    print(table)
    bad = [c for c in checks if c["status"] == "FAIL"] + [s for s in speeds if not s["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
