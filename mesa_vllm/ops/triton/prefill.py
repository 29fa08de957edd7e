"""Mesa prefill: a flash-attention kernel over (query tile, KV head) programs.

Every plan segment is bottom-right-aligned causal attention over a *key list*: a middle
segment with queries [qs, qe) reads keys [0, F) then [s, qe); causal and stair segments read
[0, qe).  List index t maps to cache index j = t, or s + (t - F) for t >= F in a middle
segment; query p sees list entries t <= qt(p) (qt = p, or F + p - s in a middle segment).
Positions are monotone along the list with steps 0 or 1: t for causal and middle, the stair
rule for stair (jit.py: angles).  The G query heads of a KV head are packed into the tile's
rows; a tile reads only its key list (first chunk + own chunk for middle segments:
O(T (F + C)) work).

Weave segments (docs/VARIANTS.md: rerope, leaky_rerope, self_extend, streaming,
lm_infinite) read the keys [0, p] (sinks [0, S) and the window (p - W, p] for the windowed
``streaming`` / ``lm_infinite``).  A pair (p, j) is near when d = p - j < w, scored with the
query at p and the key at j (both rebased by the program's first near key), else far, with
the query at fq(p) and the key at fk(j) (unrebased: every far position is below ~L by the
variant's construction).  The variant is one per engine, a constexpr ``PE`` of the kernels:
``PE_STAIR`` for the Mesa specialisations, else the kernels branch per segment between the
Mesa loops and the weave ones.  A weave prefill tile splits its key range into far-only
blocks (one key rotation, one QK product; none for ``rerope`` / ``lm_infinite``, whose far
keys sit at 0), near-only blocks (plain RoPE) and the few mixed blocks in between (both
products, picked per pair); windowed tiles visit only the blocks of [0, S) and
[first query - W + 1, last query].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mesa_vllm.ops.triton.jit import (
    KIND_MIDDLE,
    KIND_STAIR,
    KIND_WEAVE,
    MODE_FAR,
    MODE_MIXED,
    MODE_NEAR,
    NEG_BIG,
    PE_STAIR,
    TABLE_POINTERS,
    angle_table,
    attend_block,
    cache_strides,
    far_qpos,
    launch_meta,
    load_query,
    load_segment,
    mask2,
    scale_pointers,
    segment_columns,
    stair_pos,
    weave_block,
    windowed,
)
from mesa_vllm.ops.triton.table import PrefillTuning, SegmentTable, kernel_scalars

# Triton kernels take long flat argument lists; one per line would triple this section.
# fmt: off


@triton.jit
def _mesa_tile(
    acc, l_i, m_i, q1, q2, q3, qt, qt_first, t_end,
    K, V, BT, req, kind, F, s, A, E, base, hkv, inv, ci, si,
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ANGLE_ADD: tl.constexpr,
):
    """A causal / middle / stair prefill tile: the list slices every row sees entirely, then
    the diagonal ones (masked)."""
    n_full = ((qt_first + 1) // BLOCK_N) * BLOCK_N  # slices every row sees entirely
    for t0 in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = attend_block(
            acc, l_i, m_i, q1, q2, q3, qt, t0, t_end, K, V, BT, req, kind, F, s, A, E, base,
            hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, REST,
            BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, MASK=False, FAST_TRIG=FAST_TRIG,
            DOT_DTYPE=DOT_DTYPE, PREC=PREC, UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
    for t0 in range(n_full, t_end, BLOCK_N):
        acc, l_i, m_i = attend_block(
            acc, l_i, m_i, q1, q2, q3, qt, t0, t_end, K, V, BT, req, kind, F, s, A, E, base,
            hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, REST,
            BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, MASK=True, FAST_TRIG=FAST_TRIG,
            DOT_DTYPE=DOT_DTYPE, PREC=PREC, UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
    return acc, l_i, m_i


@triton.jit
def _weave_tile(
    acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, p_first, p_last, far_end,
    K, V, BT, req, hkv, inv, ci, si, W, SINK, LEAKY, GROUP,
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PE: tl.constexpr,
    FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ANGLE_ADD: tl.constexpr,
):
    """A weave prefill tile of queries [p_first, p_last]: far-only blocks [0, far_end) (the
    sinks only, windowed), mixed blocks [far_end, near_start), near-only blocks up to the
    diagonal, then the masked diagonal ones.  far_end (= floor(p_first - w + 1) to BLOCK_N)
    is also the near rebase."""
    near_start = tl.cdiv(tl.maximum(p_last - W + 1, 0), BLOCK_N) * BLOCK_N
    t_end = p_last + 1
    n_full = ((p_first + 1) // BLOCK_N) * BLOCK_N
    far_hi = far_end
    if windowed(PE):
        far_hi = tl.minimum(far_end, SINK)
    for t0 in range(0, far_hi, BLOCK_N):
        acc, l_i, m_i = weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, far_hi, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, MODE=MODE_FAR,
            CAUSAL=False, PE=PE, FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE, PREC=PREC,
            UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
    for t0 in range(far_end, tl.minimum(near_start, t_end), BLOCK_N):
        acc, l_i, m_i = weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, t_end, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, MODE=MODE_MIXED,
            CAUSAL=True, PE=PE, FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE, PREC=PREC,
            UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
    for t0 in range(near_start, n_full, BLOCK_N):
        acc, l_i, m_i = weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, t_end, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, MODE=MODE_NEAR,
            CAUSAL=False, PE=PE, FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE, PREC=PREC,
            UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
    for t0 in range(tl.maximum(near_start, n_full), t_end, BLOCK_N):
        acc, l_i, m_i = weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, t_end, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, MODE=MODE_NEAR,
            CAUSAL=True, PE=PE, FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE, PREC=PREC,
            UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
    return acc, l_i, m_i


# ---------------------------------------------------------------- kernels


@triton.jit(do_not_specialize_on_alignment=TABLE_POINTERS)
def _prefill_kernel(
    Q, K, V, Out, BT, TILE_SEG, TILE_Q0,
    SEG_QLO, SEG_QLEN, SEG_QABS, SEG_KIND, SEG_CHUNK, SEG_ANCHOR, SEG_WIDTH, SEG_REQ,
    INV_FREQ, K_SCALE, V_SCALE, qk_scale, inv_log_L, long_scale, F, W, SINK, LEAKY, FAR_C,
    GROUP,
    s_qn, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_on, s_oh, s_bt,
    KV_SCALED: tl.constexpr,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    LOG_N: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ANGLE_ADD: tl.constexpr, PE: tl.constexpr,
):
    tile = tl.program_id(0)
    hkv = tl.program_id(1)
    if KV_SCALED:  # quantized cache: k = K_SCALE * stored k, folded into the query's scale
        qk_scale = qk_scale * tl.load(K_SCALE)
    seg = tl.load(TILE_SEG + tile)
    q0 = tl.load(TILE_Q0 + tile)
    q_len = tl.load(SEG_QLEN + seg)
    q_lo, q_abs, kind, s, A, E, req = load_segment(SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK,
                                                   SEG_ANCHOR, SEG_WIDTH, SEG_REQ, seg)

    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // G
    head = hkv * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (qi < q_len)
    p = q_abs + qi
    qt = tl.where(kind == KIND_MIDDLE, F + p - s, p)  # list index of the query = its last key
    base = tl.where(kind == KIND_STAIR, A - 1 - tl.maximum(A - 1, 0) // E, 0)  # pos(key 0)
    qpos = tl.where(kind == KIND_STAIR, stair_pos(p, A, E), qt) - base
    inv = tl.load(INV_FREQ + tl.arange(0, BLOCK_HALF), mask=tl.arange(0, BLOCK_HALF) < HALF,
                  other=0.0)
    if PE == PE_STAIR:
        q1, q2, q3 = load_query(Q, q_lo + qi, head, row_ok, p, qpos, kind == KIND_STAIR, inv,
                                s_qn, s_qh, qk_scale, inv_log_L, long_scale, HALF, BLOCK_HALF, REST,
                                BLOCK_REST, LOG_N, FAST_TRIG, DOT_DTYPE)
    else:
        weave = kind == KIND_WEAVE
        # first key that is not far for every row: the tile's near rebase
        far_end = (tl.maximum(q_abs + q0 - W + 1, 0) // BLOCK_N) * BLOCK_N
        qpos = tl.where(weave, p - far_end, qpos)
        q1, q2, q3 = load_query(Q, q_lo + qi, head, row_ok, p, qpos, kind >= KIND_STAIR, inv, s_qn,
                                s_qh, qk_scale, inv_log_L, long_scale, HALF, BLOCK_HALF, REST,
                                BLOCK_REST, LOG_N, FAST_TRIG, DOT_DTYPE)

    p_first = q_abs + q0
    p_last = q_abs + tl.minimum(q0 + BLOCK_Q, q_len) - 1
    qt_first = tl.where(kind == KIND_MIDDLE, F + p_first - s, p_first)
    t_end = tl.where(kind == KIND_MIDDLE, F + p_last - s, p_last) + 1

    ci, si = angle_table(inv, BLOCK_N, BLOCK_HALF, FAST_TRIG, ANGLE_ADD)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_BIG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PE == PE_STAIR:
        acc, l_i, m_i = _mesa_tile(
            acc, l_i, m_i, q1, q2, q3, qt, qt_first, t_end, K, V, BT, req, kind, F, s, A, E,
            base, hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF,
            REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, FAST_TRIG, DOT_DTYPE, PREC, UPCAST,
            ANGLE_ADD)
    else:
        if weave:
            qf1, qf2, _ = load_query(
                Q, q_lo + qi, head, row_ok, p, far_qpos(p, W, SINK, LEAKY, FAR_C, GROUP, PE),
                kind >= KIND_STAIR, inv, s_qn, s_qh, qk_scale, inv_log_L, long_scale, HALF,
                BLOCK_HALF, REST, BLOCK_REST, LOG_N, FAST_TRIG, DOT_DTYPE)
            acc, l_i, m_i = _weave_tile(
                acc, l_i, m_i, q1, q2, qf1, qf2, q3, p, p_first, p_last, far_end, K, V, BT,
                req, hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt,
                s_vh, s_bt, HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N,
                PE, FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
        else:
            acc, l_i, m_i = _mesa_tile(
                acc, l_i, m_i, q1, q2, q3, qt, qt_first, t_end, K, V, BT, req, kind, F, s, A,
                E, base, hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF,
                BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, FAST_TRIG,
                DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_SCALED:  # v = V_SCALE * stored v
        out = out * tl.load(V_SCALE)
    dd = tl.arange(0, BLOCK_D)
    o_row = Out + (q_lo + qi).to(tl.int64) * s_on + head * s_oh
    tl.store(o_row[:, None] + dd[None, :], out.to(Out.dtype.element_ty),
             mask=mask2(row_ok, dd, HEAD, BLOCK_D))



# fmt: on
# ---------------------------------------------------------------- launcher


def mesa_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    table: SegmentTable,
    inv_freq: torch.Tensor,
    scale: float,
    output: torch.Tensor,
    *,
    rotary_dim: int | None = None,
    tuning: PrefillTuning | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mesa attention of every query row listed in ``table`` (any segment kinds and lengths).

    query [n, Hq, D] fp16/bf16/fp32, unrotated; key_cache / value_cache [num_blocks,
    block_size, Hkv, D] (keys unrotated, Hq % Hkv == 0); block_table int32 [num_reqs,
    max_blocks]; inv_freq fp32 [rotary_dim // 2] (neox pairing, rotary_dim <= D, default
    2 * len(inv_freq)); output [n, Hq, D] (rows not in ``table`` are left untouched).
    tuning: launch options (``PrefillTuning``; None: the defaults, from the H200 sweep in
    benchmarks/kernels_h200.md, where tiles of 256 rows / 16 warps were 3% faster).
    kv_scales: (k_scale, v_scale) fp32 one-element tensors of a quantized cache (fp8: the
    true keys / values are scale * stored), read on the device; None: unscaled.
    Returns ``output``.
    """
    if table.num_tiles == 0:
        return output
    tuning = tuning or PrefillTuning()
    meta, Hkv, interp = launch_meta(query, key_cache, value_cache, inv_freq, rotary_dim)
    block_m = max(16, triton.next_power_of_2(table.block_q * meta["G"]))
    block_n = tuning.block_n
    if block_n is None:
        wide = meta["BLOCK_D"] > 128 or query.dtype == torch.float32
        block_n = 16 if interp else (32 if wide else 64)
    _prefill_kernel[(table.num_tiles, Hkv)](
        Q=query, K=key_cache, V=value_cache, Out=output, BT=block_table,
        TILE_SEG=table.tile_seg, TILE_Q0=table.tile_q0, **segment_columns(table),
        INV_FREQ=inv_freq, **scale_pointers(kv_scales, inv_freq), **kernel_scalars(table, scale),
        **cache_strides(query, key_cache, value_cache), s_on=output.stride(0),
        s_oh=output.stride(1), s_bt=block_table.stride(0),
        BLOCK_Q=table.block_q, BLOCK_M=block_m, BLOCK_N=block_n, LOG_N=table.log_n,
        FAST_TRIG=not interp if tuning.fast_trig is None else tuning.fast_trig,
        ANGLE_ADD=tuning.angle_add, PE=table.pe,
        num_warps=tuning.num_warps or (4 if block_m <= 64 else 8),
        num_stages=tuning.num_stages or 2, **meta,
    )  # fmt: skip
    return output
