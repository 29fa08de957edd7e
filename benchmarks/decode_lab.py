"""Decode-kernel lab on the GPU: where does the Mesa decode kernel lose to FA3?

Runs experimental copies of session 3's stair decode loop (every key turned as loaded) on
the Llama-2-7B decode shape of ``bench_kernels.py`` (32 x 128 MHA, bf16, cache block 16, one
token at S - 1), timed as CUDA-graph replays, next to the production ``mesa_decode`` and
FA3's paged decode.  Results and what they led to: ``benchmarks/decode_experiments_h200.md``
(experiment 4; there "production" was still session 3's kernel).

* ``MODE`` 0: session 3's math (keys turned by sin/cos of their stair position);
  1: keys turned by a loop-invariant cos/sin table (no trig in the loop: wrong values,
  timing only); 2: keys not turned at all (wrong values, timing only).
* ``PREFETCH``: the next key block's keys and values are loaded into registers before the
  current block is computed (software double-buffering; ``num_stages`` 1).

Exact variants (MODE 0) are compared with the production kernel's output.  The copies load
K and V at the top of the loop, so they are not speed replicas: compare them with each
other.  Prints one table (ms per layer-call, registers, spills) and writes
``$OUT/decode_lab.json``.

    python3 benchmarks/decode_lab.py [--lengths 32768,131072]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kernels as bk  # noqa: E402

from mesa_vllm.ops import triton_mesa as tm  # noqa: E402
from mesa_vllm.plan import MesaParams  # noqa: E402

# fmt: off


@triton.jit
def _lab_load(K, V, BT, req, t0, hi, kind, F, s, hkv, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
              HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HEAD: tl.constexpr,
              BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    t = t0 + tl.arange(0, BLOCK_N)
    kmask = t < hi
    j = tl.where((kind == 1) & (t >= F), s + t - F, t)
    page = tl.load(BT + req * s_bt + j // PAGE, mask=kmask, other=0).to(tl.int64)
    slot = (j % PAGE).to(tl.int64)
    k_row = K + page * s_kb + slot * s_kt + hkv * s_kh
    dh = tl.arange(0, BLOCK_HALF)
    hm = tm._mask2(kmask, dh, HALF, BLOCK_HALF)
    k1 = tl.load(k_row[:, None] + dh[None, :], mask=hm, other=0.0)
    k2 = tl.load(k_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0)
    dd = tl.arange(0, BLOCK_D)
    v_row = V + page * s_vb + slot * s_vt + hkv * s_vh
    v = tl.load(v_row[:, None] + dd[None, :], mask=tm._mask2(kmask, dd, HEAD, BLOCK_D), other=0.0)
    return k1, k2, v


@triton.jit
def _lab_block(acc, l_i, m_i, q1, q2, k1, k2, v, t0, hi, kind, A, E, base, inv, ci, si,
               BLOCK_N: tl.constexpr, MODE: tl.constexpr, FAST_TRIG: tl.constexpr,
               DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    t = t0 + tl.arange(0, BLOCK_N)
    kmask = t < hi
    k1 = k1.to(tl.float32)
    k2 = k2.to(tl.float32)
    if MODE == 0:
        ck, sk = tm._cos_sin(tl.where(kind == 2, tm._stair(t, A, E), t) - base, inv, FAST_TRIG)
        k1r = (k1 * ck - k2 * sk).to(DOT_DTYPE)
        k2r = (k2 * ck + k1 * sk).to(DOT_DTYPE)
    elif MODE == 1:
        k1r = (k1 * ci - k2 * si).to(DOT_DTYPE)
        k2r = (k2 * ci + k1 * si).to(DOT_DTYPE)
    else:
        k1r = k1.to(DOT_DTYPE)
        k2r = k2.to(DOT_DTYPE)
    qk = tl.zeros([q1.shape[0], BLOCK_N], dtype=tl.float32)
    qk = tm._dot(q1, tl.trans(k1r), qk, UPCAST, "tf32")
    qk = tm._dot(q2, tl.trans(k2r), qk, UPCAST, "tf32")
    qk = tl.where(kmask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tm._dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], UPCAST, "tf32")
    return acc, l_i, m_new


@triton.jit
def _lab_decode_kernel(
    Q, K, V, BT, M_WS, L_WS, ACC_WS,
    SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK, SEG_ANCHOR, SEG_REQ, INV_FREQ,
    qk_scale, inv_log_L, F, E, num_splits, min_split,
    s_qn, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, LOG_N: tl.constexpr, FAST_TRIG: tl.constexpr,
    DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, MODE: tl.constexpr, PREFETCH: tl.constexpr,
):
    """The stair path of ``_decode_kernel`` (full rotary, no REST dims), with MODE/PREFETCH."""
    seg = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    q_lo = tl.load(SEG_QLO + seg)
    p_abs = tl.load(SEG_QABS + seg)
    kind = tl.load(SEG_KIND + seg)
    s = tl.load(SEG_CHUNK + seg)
    A = tl.load(SEG_ANCHOR + seg)
    req = tl.load(SEG_REQ + seg)
    rows = tl.arange(0, BLOCK_G)
    head = hkv * G + rows
    row_ok = rows < G
    p = tl.zeros([BLOCK_G], dtype=tl.int32) + p_abs
    qt = tl.where(kind == 1, F + p - s, p)
    base = tl.where(kind == 2, A - 1 - tl.maximum(A - 1, 0) // E, 0)
    qpos = tl.where(kind == 2, tm._stair(p, A, E), qt) - base
    dh = tl.arange(0, BLOCK_HALF)
    inv = tl.load(INV_FREQ + dh, mask=dh < HALF, other=0.0)
    ci, si = tm._cos_sin(tl.arange(0, BLOCK_N), inv, FAST_TRIG)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) + tm._NEG_BIG
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    n_keys = tm._mesa_n_keys(kind, p_abs, F, s)
    idx = (seg * (G * tl.num_programs(1)) + head) * num_splits + split
    per_split = tm._split_len(n_keys, num_splits, min_split, 1 << 30, 0, BLOCK_N)  # grid only
    lo = split * per_split
    if lo < n_keys:
        hi = tl.minimum(lo + per_split, n_keys)
        q1, q2, q3 = tm._load_query(Q, q_lo + rows * 0, head, row_ok, p, qpos, kind == 2, inv,
                                    s_qn, s_qh, qk_scale, inv_log_L, HALF, BLOCK_HALF, 0, 16,
                                    LOG_N, FAST_TRIG, DOT_DTYPE)
        if PREFETCH:
            k1, k2, v = _lab_load(K, V, BT, req, lo, hi, kind, F, s, hkv, s_kb, s_kt, s_kh,
                                  s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, HEAD, BLOCK_D, PAGE,
                                  BLOCK_N)
            for t0 in range(lo, hi, BLOCK_N):
                k1n, k2n, vn = _lab_load(K, V, BT, req, t0 + BLOCK_N, hi, kind, F, s, hkv, s_kb,
                                         s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF,
                                         HEAD, BLOCK_D, PAGE, BLOCK_N)
                acc, l_i, m_i = _lab_block(acc, l_i, m_i, q1, q2, k1, k2, v, t0, hi, kind, A, E,
                                           base, inv, ci, si, BLOCK_N, MODE, FAST_TRIG,
                                           DOT_DTYPE, UPCAST)
                k1, k2, v = k1n, k2n, vn
        else:
            for t0 in range(lo, hi, BLOCK_N):
                k1, k2, v = _lab_load(K, V, BT, req, t0, hi, kind, F, s, hkv, s_kb, s_kt, s_kh,
                                      s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, HEAD, BLOCK_D,
                                      PAGE, BLOCK_N)
                acc, l_i, m_i = _lab_block(acc, l_i, m_i, q1, q2, k1, k2, v, t0, hi, kind, A, E,
                                           base, inv, ci, si, BLOCK_N, MODE, FAST_TRIG,
                                           DOT_DTYPE, UPCAST)
        tm._store_split(M_WS, L_WS, ACC_WS, idx, m_i, l_i, acc, row_ok, BLOCK_D)


# fmt: on


def lab_decode(pb, out, num_splits, mode, prefetch, block_n, warps, stages):
    """Lab kernel + the production reduction; returns the compiled lab kernel."""
    table, q = pb["dec"], pb["query"]
    meta, Hkv, _ = tm._common(q, pb["key_cache"], pb["value_cache"], pb["inv"], None)
    n_seg, Hq = table.num_segments, q.shape[1]
    size = n_seg * Hq * num_splits
    ws = pb.setdefault(
        ("ws", num_splits),
        (
            torch.empty(size, dtype=torch.float32, device=q.device),
            torch.empty(size, dtype=torch.float32, device=q.device),
            torch.empty(size, meta["BLOCK_D"], dtype=torch.float32, device=q.device),
        ),
    )
    min_split = -(-256 // block_n) * block_n
    seg = (table.q_lo, table.q_abs, table.kind, table.chunk_start, table.anchor, table.req)
    k = _lab_decode_kernel[(n_seg, Hkv, num_splits)](
        q, pb["key_cache"], pb["value_cache"], pb["block_table"], *ws, *seg, pb["inv"],
        *tm._scalars(table, pb["scale"])[:4], num_splits, min_split,
        *tm._strides(q, pb["key_cache"], pb["value_cache"]), pb["block_table"].stride(0),
        G=meta["G"], BLOCK_G=16, BLOCK_N=block_n, HALF=meta["HALF"],
        BLOCK_HALF=meta["BLOCK_HALF"], HEAD=meta["HEAD"], BLOCK_D=meta["BLOCK_D"],
        PAGE=meta["PAGE"], LOG_N=table.log_n, FAST_TRIG=not tm._interpreting(),
        DOT_DTYPE=meta["DOT_DTYPE"], UPCAST=meta["UPCAST"], MODE=mode, PREFETCH=prefetch,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    tm._decode_reduce_kernel[(n_seg, Hq)](
        out, *ws, table.q_lo, table.q_abs, table.kind, table.chunk_start, table.first_chunk,
        num_splits, min_split, 1 << 30, 0, out.stride(0), out.stride(1), HEAD=meta["HEAD"],
        BLOCK_D=meta["BLOCK_D"], BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_N=block_n, BUSY_ONLY=True, num_warps=4,
    )  # fmt: skip
    return k


# mode, prefetch, block_n, warps, stages
LAB = [
    (0, False, 64, 4, 3), (1, False, 64, 4, 3), (2, False, 64, 4, 3),
    (0, True, 64, 4, 1), (1, True, 64, 4, 1), (2, True, 64, 4, 1),
    (0, True, 32, 4, 1), (0, True, 64, 8, 1), (0, False, 128, 8, 2), (0, True, 128, 8, 1),
    (0, False, 32, 2, 3), (0, True, 32, 2, 1),
]  # fmt: skip
SPLITS = (32, 64, 128)


def lab_length(S, D, H, page, params, fa) -> list[dict]:
    """Production kernel, FA3 and every LAB config at context S (best of SPLITS each)."""
    pb = bk.speed_problem(S, S - 1, D, H, page, params, 1, seed=11)
    ref = torch.empty_like(pb["query"])
    bk.run(pb, 64, out=ref)
    prod = min(bk.bench_ms(lambda sp=sp: bk.run(pb, sp, out=ref), graph=True) for sp in SPLITS)
    base = bk.bench_ms(bk.baseline_decode(fa, S, H, D), graph=True) if fa else float("nan")
    print(f"S={S}: production {prod:.4f} ms, FA3 {base:.4f} ms", flush=True)
    rows = [dict(S=S, cfg="production", ms=prod, fa3_ms=base)]
    out = torch.empty_like(ref)
    for cfg in LAB:
        best, info = float("inf"), {}
        for sp in SPLITS:
            try:
                k = lab_decode(pb, out, sp, *cfg)
                ms = bk.bench_ms(lambda sp=sp, cfg=cfg: lab_decode(pb, out, sp, *cfg), True)
            except Exception as e:  # noqa: BLE001 - report, go on
                print(f"S={S} {cfg} {sp}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                break
            if ms < best:
                diff = float((out.float() - ref.float()).abs().max())
                best = ms
                info = dict(splits=sp, n_regs=getattr(k, "n_regs", -1),
                            n_spills=getattr(k, "n_spills", -1), max_diff=diff)  # fmt: skip
        rows.append(dict(S=S, cfg=list(cfg), ms=best, fa3_ms=base, **info))
        print(json.dumps(rows[-1]), flush=True)
    pb.clear()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    D, H, page = bk.SPEED_SHAPE
    params = MesaParams(*bk.LLAMA2.values())
    _, fa = bk.baselines()
    rows = []
    for S in map(int, args.lengths.split(",")):
        rows += lab_length(S, D, H, page, params, fa)
        torch.cuda.empty_cache()
    lines = [
        "| S | mode, prefetch, BLOCK_N, warps, stages | ms | / FA3 | splits | regs | spills "
        "| max diff vs production |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = r["cfg"] if isinstance(r["cfg"], str) else ", ".join(map(str, r["cfg"]))
        lines.append(
            f"| {r['S']} | {cfg} | {r['ms']:.4f} | {r['ms'] / r['fa3_ms']:.2f} | "
            f"{r.get('splits', '')} | {r.get('n_regs', '')} | {r.get('n_spills', '')} | "
            f"{r.get('max_diff', float('nan')):.1e} |"
        )
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_lab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
