"""Mesa decode: split-KV flash-decoding for single-query segments, with a reduction kernel.

It does no host sync and its launch shapes depend only on host ints, so it can be captured
in a CUDA graph.  Its stair keys below the anchor (nearly all keys of a long context) are
not turned at all: a key block spans a few stair positions, so the tile's rows hold the
query turned once per position (relative angle) and each row scores only the keys at its
position (``_stair_block``); the other keys are turned as they are loaded.  A weave split
(docs/VARIANTS.md) walks the far keys [0, p - w] (windowed: the sinks) and then the near
keys, so it never needs both products.
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
    MODE_NEAR,
    NEG_BIG,
    PE_STAIR,
    SPLIT_ARGS,
    TABLE_POINTERS,
    angle_table,
    attend_block,
    cache_strides,
    dot,
    far_qpos,
    launch_meta,
    load_query,
    load_segment,
    mask2,
    online_softmax,
    scale_pointers,
    scaled_query,
    segment_columns,
    stair_pos,
    turn,
    weave_block,
    windowed,
)
from mesa_vllm.ops.triton.table import (
    DECODE_MIN_SPLIT_KEYS,
    DECODE_REDUCE_SPLITS,
    DECODE_STAIR_ROWS,
    DecodeTuning,
    SegmentTable,
    decode_busy_splits,
    decode_split_sizing,
    kernel_scalars,
)

# Triton kernels take long flat argument lists; one per line would triple this section.
# fmt: off


@triton.jit
def _mesa_n_keys(kind, p_abs, F, s):
    """Length of a Mesa segment's key list for its query at absolute index p_abs: F + p - s + 1
    for a middle segment (first chunk + own chunk), else p + 1."""
    return tl.where(kind == KIND_MIDDLE, F + p_abs - s, p_abs) + 1


@triton.jit
def _split_len(n_keys, num_splits, min_split, split_div, split_keys, BLOCK_N: tl.constexpr):
    """Keys per decode split, in whole key blocks: n_keys / num_splits (the grid's splits) at
    least; at least n_keys / split_div, capped at split_keys and rounded down (the sequence's
    own split count: a grid sized for max_model_len would cut a short sequence finer than
    it should); at least min_split."""
    own = tl.minimum(tl.cdiv(n_keys, split_div), split_keys) // BLOCK_N * BLOCK_N  # rounded down
    per = tl.maximum(tl.cdiv(tl.cdiv(n_keys, num_splits), BLOCK_N) * BLOCK_N, own)
    return tl.maximum(per, min_split)


@triton.jit
def _split_order(pid, n_keys, per_split, TAIL_FIRST: tl.constexpr):
    """The split program pid runs: pid, or with TAIL_FIRST the busy splits last to first (the
    GPU starts programs in grid order, and a sequence's last split, which holds the keys
    turned as loaded, is its slowest); the idle splits stay last either way."""
    if TAIL_FIRST:
        busy = tl.cdiv(n_keys, per_split)
        return tl.where(pid < busy, busy - 1 - pid, pid)
    return pid


@triton.jit
def _store_split(M_WS, L_WS, ACC_WS, idx, m_i, l_i, acc, row_ok, BLOCK_D: tl.constexpr):
    """One split's softmax state (m, l [rows], acc [rows, BLOCK_D]) at workspace rows idx."""
    tl.store(M_WS + idx, m_i, mask=row_ok)
    tl.store(L_WS + idx, l_i, mask=row_ok)
    dd = tl.arange(0, BLOCK_D)
    tl.store(ACC_WS + idx.to(tl.int64)[:, None] * BLOCK_D + dd[None, :], acc,
             mask=row_ok[:, None])


@triton.jit
def _stair_block(
    acc, l_i, m_i, q1r, q2r, q3, v_r, t0, pos0, K, V, BT, req, A, E, hkv,
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Decode over the stair keys [t0, t0 + BLOCK_N), all below the anchor, keys unturned.

    <R(a) q, R(b) k> = <R(a - b) q, k>, so tile row r holds the query turned by
    qpos - (pos0 + v_r) and scores only the keys at stair position pos0 + v_r (pos0: the
    position of the block's first key; every key of the block lies within pos0 + [0, NV)).
    Each row is its own online-softmax stream; the caller merges a head's rows at the end.
    q1r/q2r [M, BLOCK_HALF], q3 [M, BLOCK_REST] DOT_DTYPE; v_r int32 [M].  The keys go to
    the tensor cores as loaded: no trig, no turned copy of the keys.
    """
    t = t0 + tl.arange(0, BLOCK_N)
    dh = tl.arange(0, BLOCK_HALF)
    dd = tl.arange(0, BLOCK_D)
    whole = tl.full([BLOCK_N], 1, tl.int1)  # every key of the block is in the list
    page = tl.load(BT + req * s_bt + t // PAGE).to(tl.int64)
    slot = (t % PAGE).to(tl.int64)
    k_row = K + page * s_kb + slot * s_kt + hkv * s_kh
    hm = mask2(whole, dh, HALF, BLOCK_HALF)
    k1 = tl.load(k_row[:, None] + dh[None, :], mask=hm, other=0.0).to(DOT_DTYPE)
    k2 = tl.load(k_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(DOT_DTYPE)
    qk = tl.zeros([q1r.shape[0], BLOCK_N], dtype=tl.float32)
    qk = dot(q1r, tl.trans(k1), qk, UPCAST, PREC)
    qk = dot(q2r, tl.trans(k2), qk, UPCAST, PREC)
    if REST > 0:
        dr = tl.arange(0, BLOCK_REST)
        k3 = tl.load(k_row[:, None] + 2 * HALF + dr[None, :],
                     mask=mask2(whole, dr, REST, BLOCK_REST), other=0.0)
        qk = dot(q3, tl.trans(k3.to(DOT_DTYPE)), qk, UPCAST, PREC)
    v_k = stair_pos(t, A, E) - pos0
    qk = tl.where(v_r[:, None] == v_k[None, :], qk, float("-inf"))
    v_row = V + page * s_vb + slot * s_vt + hkv * s_vh
    return online_softmax(acc, l_i, m_i, qk, v_row, whole, dd, HEAD, BLOCK_D, DOT_DTYPE, PREC,
                          UPCAST)


@triton.jit
def _merge_rows(m_i, l_i, acc, NV: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the NV softmax streams of each head (rows r = v * G_PAD + g) into one per head:
    m, l [G_PAD], acc [G_PAD, BLOCK_D]."""
    m3 = tl.reshape(m_i, [NV, G_PAD])
    m = tl.max(m3, 0)
    w = tl.exp2(m3 - m[None, :])
    l_h = tl.sum(tl.reshape(l_i, [NV, G_PAD]) * w, 0)
    acc_h = tl.sum(tl.reshape(acc, [NV, G_PAD, BLOCK_D]) * w[:, :, None], 0)
    return m, l_h, acc_h


@triton.jit(do_not_specialize=SPLIT_ARGS, do_not_specialize_on_alignment=TABLE_POINTERS)
def _decode_kernel(
    Q, K, V, BT, M_WS, L_WS, ACC_WS,
    SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK, SEG_ANCHOR, SEG_WIDTH, SEG_REQ, INV_FREQ,
    K_SCALE, V_SCALE, qk_scale, inv_log_L, long_scale, F, W, SINK, LEAKY, FAR_C, GROUP,
    num_splits,
    min_split, split_div, split_keys,
    s_qn, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    KV_SCALED: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, NV: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    LOG_N: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ANGLE_ADD: tl.constexpr, PE: tl.constexpr, TURN_QUERY: tl.constexpr,
    TAIL_FIRST: tl.constexpr,
):
    """Split-KV decode, program (segment, KV head, split); BLOCK_G = G_PAD * NV tile rows;
    TURN_QUERY: stair blocks by ``_stair_block`` (else every key is turned as loaded);
    TAIL_FIRST: a sequence's busy splits start last to first (``_split_order``)."""
    seg = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    if KV_SCALED:  # quantized cache: the key scale goes into the query's (V_SCALE: reduce)
        qk_scale = qk_scale * tl.load(K_SCALE)
    q_lo, p_abs, kind, s, A, E, req = load_segment(SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK,
                                                   SEG_ANCHOR, SEG_WIDTH, SEG_REQ, seg)

    rows = tl.arange(0, BLOCK_G)
    p = tl.zeros([BLOCK_G], dtype=tl.int32) + p_abs
    qt = tl.where(kind == KIND_MIDDLE, F + p - s, p)
    base = tl.where(kind == KIND_STAIR, A - 1 - tl.maximum(A - 1, 0) // E, 0)
    qpos = tl.where(kind == KIND_STAIR, stair_pos(p, A, E), qt) - base
    inv = tl.load(INV_FREQ + tl.arange(0, BLOCK_HALF), mask=tl.arange(0, BLOCK_HALF) < HALF,
                  other=0.0)
    ci, si = angle_table(inv, BLOCK_N, BLOCK_HALF, FAST_TRIG, ANGLE_ADD)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) + NEG_BIG
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    n_keys = _mesa_n_keys(kind, p_abs, F, s)
    if PE == PE_STAIR:
        # An idle split (a short sequence in a grid sized for max_model_len) does nothing:
        # the reduction reads only the busy splits.
        per_split = _split_len(n_keys, num_splits, min_split, split_div, split_keys, BLOCK_N)
        split = _split_order(split, n_keys, per_split, TAIL_FIRST)
        lo = split * per_split
        if lo < n_keys:
            hi = tl.minimum(lo + per_split, n_keys)
            # Tile row r = v * G_PAD + g: head g, and in stair blocks the v-th stair position
            # of the block (_stair_block); in the other blocks only rows v = 0 see keys.
            g_r = rows % G_PAD
            v_r = rows // G_PAD
            q1, q2, q3 = scaled_query(Q, q_lo + rows * 0, hkv * G + g_r, g_r < G, p,
                                      kind == KIND_STAIR, s_qn, s_qh, qk_scale, inv_log_L,
                                      long_scale, HALF, BLOCK_HALF, REST, BLOCK_REST, LOG_N,
                                      DOT_DTYPE)
            stair_end = lo
            if TURN_QUERY:
                # Whole key blocks below the anchor, while a block spans <= NV stair positions
                few = (kind == KIND_STAIR) & ((BLOCK_N - 1) // E + 2 <= NV)
                n_stair = tl.where(few, tl.maximum(tl.minimum(A, hi) - lo, 0) // BLOCK_N, 0)
                stair_end = lo + n_stair * BLOCK_N
                q_stair = stair_pos(p_abs, A, E)
                qa, qb = turn(q1, q2, -v_r, inv, FAST_TRIG, tl.float32)
                # the query turned per block, in one loop (Triton pipelines only the
                # innermost loop: a turn shared by a run of blocks, a nested loop, lost on
                # the H200, benchmarks/decode_experiments_h200.md, experiments 6 and 7)
                for t0 in range(lo, stair_end, BLOCK_N):
                    pos0 = stair_pos(t0, A, E)
                    q1s, q2s = turn(qa, qb, tl.zeros([1], dtype=tl.int32) + (q_stair - pos0),
                                    inv, FAST_TRIG, DOT_DTYPE)
                    acc, l_i, m_i = _stair_block(
                        acc, l_i, m_i, q1s, q2s, q3, v_r, t0, pos0, K, V, BT, req, A, E, hkv,
                        s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, REST,
                        BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, DOT_DTYPE, PREC, UPCAST)
            q1r, q2r = turn(q1, q2, qpos, inv, FAST_TRIG, DOT_DTYPE)
            for t0 in range(stair_end, hi, BLOCK_N):
                acc, l_i, m_i = attend_block(
                    acc, l_i, m_i, q1r, q2r, q3, tl.where(v_r == 0, qt, -1), t0, hi, K, V, BT,
                    req, kind, F, s, A, E, base, hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt,
                    s_vh, s_bt, HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N,
                    MASK=True, FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE, PREC=PREC, UPCAST=UPCAST,
                    ANGLE_ADD=ANGLE_ADD)
            m_h, l_h, acc_h = _merge_rows(m_i, l_i, acc, NV, G_PAD, BLOCK_D)
            g = tl.arange(0, G_PAD)
            idx_h = (seg * (G * tl.num_programs(1)) + hkv * G + g) * num_splits + split
            _store_split(M_WS, L_WS, ACC_WS, idx_h, m_h, l_h, acc_h, g < G, BLOCK_D)
    else:
        # Weave: the key list is the far keys [0, fe_l), then the near keys from j = fe_j
        # on (list index t -> key t + shift); windowed, the far keys are the sinks.  Tile
        # row r is head r (r < G).
        head = hkv * G + rows
        row_ok = rows < G
        idx = (seg * (G * tl.num_programs(1)) + head) * num_splits + split  # [rows, Hq, splits]
        weave = kind == KIND_WEAVE
        fe_j = tl.maximum(p_abs - W + 1, 0)
        if windowed(PE):
            fe_l = tl.minimum(SINK, fe_j)
        else:
            fe_l = fe_j
        shift = fe_j - fe_l
        qpos = tl.where(weave, p - fe_j, qpos)
        n_keys = tl.where(weave, p_abs + 1 - shift, n_keys)
        per_split = _split_len(n_keys, num_splits, min_split, split_div, split_keys, BLOCK_N)
        split = _split_order(split, n_keys, per_split, TAIL_FIRST)
        lo = split * per_split
        hi = tl.minimum(lo + per_split, n_keys)
        q1, q2, q3 = load_query(Q, q_lo + rows * 0, head, row_ok, p, qpos, kind >= KIND_STAIR, inv,
                                s_qn, s_qh, qk_scale, inv_log_L, long_scale, HALF, BLOCK_HALF, REST,
                                BLOCK_REST, LOG_N, FAST_TRIG, DOT_DTYPE)
        if weave:
            qf1, qf2, _ = load_query(
                Q, q_lo + rows * 0, head, row_ok, p,
                far_qpos(p, W, SINK, LEAKY, FAR_C, GROUP, PE), kind >= KIND_STAIR, inv, s_qn, s_qh,
                qk_scale, inv_log_L, long_scale, HALF, BLOCK_HALF, REST, BLOCK_REST, LOG_N,
                FAST_TRIG, DOT_DTYPE)
            far_hi = tl.minimum(hi, fe_l)
            for t0 in range(lo, far_hi, BLOCK_N):
                acc, l_i, m_i = weave_block(
                    acc, l_i, m_i, q1, q2, qf1, qf2, q3, p, t0, far_hi, 0, fe_j, K, V, BT, req,
                    hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                    s_bt, HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N,
                    MODE=MODE_FAR, CAUSAL=False, PE=PE, FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE,
                    PREC=PREC, UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
            for t0 in range(tl.maximum(lo, fe_l), hi, BLOCK_N):
                acc, l_i, m_i = weave_block(
                    acc, l_i, m_i, q1, q2, qf1, qf2, q3, p, t0, hi, shift, fe_j, K, V, BT, req,
                    hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                    s_bt, HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N,
                    MODE=MODE_NEAR, CAUSAL=False, PE=PE, FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE,
                    PREC=PREC, UPCAST=UPCAST, ANGLE_ADD=ANGLE_ADD)
        else:
            for t0 in range(lo, hi, BLOCK_N):
                acc, l_i, m_i = attend_block(
                    acc, l_i, m_i, q1, q2, q3, qt, t0, hi, K, V, BT, req, kind, F, s, A, E,
                    base, hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF,
                    BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, MASK=True,
                    FAST_TRIG=FAST_TRIG, DOT_DTYPE=DOT_DTYPE, PREC=PREC, UPCAST=UPCAST,
                    ANGLE_ADD=ANGLE_ADD)
        _store_split(M_WS, L_WS, ACC_WS, idx, m_i, l_i, acc, row_ok, BLOCK_D)


@triton.jit(do_not_specialize=SPLIT_ARGS, do_not_specialize_on_alignment=TABLE_POINTERS)
def _decode_reduce_kernel(
    Out, M_WS, L_WS, ACC_WS, SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK, V_SCALE, F, num_splits,
    min_split, split_div, split_keys,
    s_on, s_oh,
    KV_SCALED: tl.constexpr,
    HEAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    BUSY_ONLY: tl.constexpr,
):
    """Merge the splits of one (segment, head), BLOCK_S at a time (a fixed block, so that no
    split count compiles a variant of its own); BUSY_ONLY (Mesa segments): only the splits
    ``_decode_kernel`` ran, the others' workspace is stale."""
    seg = tl.program_id(0)
    head = tl.program_id(1)
    n_busy = num_splits
    if BUSY_ONLY:
        n_keys = _mesa_n_keys(tl.load(SEG_KIND + seg), tl.load(SEG_QABS + seg), F,
                              tl.load(SEG_CHUNK + seg))
        per_split = _split_len(n_keys, num_splits, min_split, split_div, split_keys, BLOCK_N)
        n_busy = tl.minimum(tl.cdiv(n_keys, per_split), num_splits)
    base = (seg * tl.num_programs(1) + head) * num_splits
    dd = tl.arange(0, BLOCK_D)
    m_run = tl.full([1], NEG_BIG, tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc_run = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_busy, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        ok = sp < n_busy
        m = tl.load(M_WS + base + sp, mask=ok, other=NEG_BIG)
        l_s = tl.load(L_WS + base + sp, mask=ok, other=0.0)
        acc = tl.load(ACC_WS + (base + sp).to(tl.int64)[:, None] * BLOCK_D + dd[None, :],
                      mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        alpha = tl.exp2(m_run - m_new)
        w = tl.where(ok, tl.exp2(m - m_new), 0.0)
        l_run = l_run * alpha + tl.sum(l_s * w, 0)
        acc_run = acc_run * alpha + tl.sum(acc * w[:, None], 0)
        m_run = m_new
    out = acc_run / l_run
    if KV_SCALED:  # v = V_SCALE * stored v
        out = out * tl.load(V_SCALE)
    q_lo = tl.load(SEG_QLO + seg)
    tl.store(Out + q_lo.to(tl.int64) * s_on + head * s_oh + dd, out.to(Out.dtype.element_ty),
             mask=dd < HEAD)


# fmt: on
# ---------------------------------------------------------------- launcher


def mesa_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    table: SegmentTable,
    inv_freq: torch.Tensor,
    scale: float,
    output: torch.Tensor,
    num_splits: int,
    *,
    rotary_dim: int | None = None,
    max_seq_len: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tuning: DecodeTuning | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Split-KV decode: every segment of ``table`` must hold exactly one query.

    Shapes as ``mesa_prefill``; ``num_splits`` a host int (``decode_num_splits``): the grid's
    split count at most; max_seq_len (a host int, e.g. max_model_len; None: unknown) lets the
    launch shrink the grid to the splits a sequence that long can keep busy
    (``decode_busy_splits``), which drops idle programs and changes no split.  workspace:
    (m, l fp32 [num_segments * Hq * num_splits], acc fp32 [num_segments * Hq * num_splits,
    BLOCK_D]) or None to allocate.  tuning: launch options (``DecodeTuning``; None: the
    defaults measured on the H200).  kv_scales: as ``mesa_prefill``.  Splits past a
    sequence's own count return at once (Mesa segments).

    No host sync, grid from host ints: CUDA-graph safe when ``table`` and ``workspace`` live
    in persistent buffers.  Returns ``output``.
    """
    tuning = tuning or DecodeTuning()
    n_seg = table.num_segments
    if n_seg == 0:
        return output
    meta, Hkv, interp = launch_meta(query, key_cache, value_cache, inv_freq, rotary_dim,
                                    tuning.fp8_f16_dot)  # fmt: skip
    Hq = query.shape[1]
    block_n = tuning.block_n
    if block_n is None:
        block_n = 16 if interp else (32 if query.dtype == torch.float32 else 128)
    min_split_keys = tuning.min_split_keys
    if min_split_keys is None:
        min_split_keys = block_n if interp else DECODE_MIN_SPLIT_KEYS
    min_split, split_div, split_keys = decode_split_sizing(
        n_seg * Hkv, block_n, min_split_keys, tuning.split_keys, tuning.split_programs
    )
    if max_seq_len is not None:
        busy = decode_busy_splits(max_seq_len, num_splits, min_split, split_div, split_keys,
                                  block_n)  # fmt: skip
        num_splits = min(num_splits, busy)
    splits = dict(num_splits=num_splits, min_split=min_split, split_div=split_div,
                  split_keys=split_keys)  # fmt: skip
    if workspace is None:
        size, dev = n_seg * Hq * num_splits, query.device
        workspace = (
            torch.empty(size, dtype=torch.float32, device=dev),
            torch.empty(size, dtype=torch.float32, device=dev),
            torch.empty(size, meta["BLOCK_D"], dtype=torch.float32, device=dev),
        )
    m_ws, l_ws, acc_ws = workspace
    # tile rows: the G heads (padded) x at least DECODE_STAIR_ROWS stair positions (a weave
    # engine's decode has no stair rows: the G heads only)
    g_pad = triton.next_power_of_2(meta["G"])
    stair_rows = DECODE_STAIR_ROWS if table.pe == PE_STAIR else 1
    block_g = max(tuning.tile_rows, g_pad * stair_rows)
    columns = segment_columns(table)
    del columns["SEG_QLEN"]
    scales = scale_pointers(kv_scales, inv_freq)
    _decode_kernel[(n_seg, Hkv, num_splits)](
        Q=query, K=key_cache, V=value_cache, BT=block_table, M_WS=m_ws, L_WS=l_ws,
        ACC_WS=acc_ws, **columns, INV_FREQ=inv_freq, **scales, **kernel_scalars(table, scale),
        **splits,
        **cache_strides(query, key_cache, value_cache), s_bt=block_table.stride(0),
        G_PAD=g_pad, NV=block_g // g_pad, BLOCK_G=block_g, BLOCK_N=block_n, LOG_N=table.log_n,
        FAST_TRIG=not interp if tuning.fast_trig is None else tuning.fast_trig,
        ANGLE_ADD=tuning.angle_add, PE=table.pe, TURN_QUERY=tuning.turn_query,
        TAIL_FIRST=bool(tuning.tail_first), num_warps=tuning.num_warps or 4,
        num_stages=tuning.num_stages or 3, **meta,
    )  # fmt: skip
    _decode_reduce_kernel[(n_seg, Hq)](
        Out=output, M_WS=m_ws, L_WS=l_ws, ACC_WS=acc_ws, SEG_QLO=table.q_lo,
        SEG_QABS=table.q_abs, SEG_KIND=table.kind, SEG_CHUNK=table.chunk_start,
        V_SCALE=scales["V_SCALE"], KV_SCALED=scales["KV_SCALED"],
        F=table.first_chunk, **splits, s_on=output.stride(0), s_oh=output.stride(1),
        HEAD=meta["HEAD"], BLOCK_D=meta["BLOCK_D"],
        BLOCK_S=DECODE_REDUCE_SPLITS, BLOCK_N=block_n,
        BUSY_ONLY=table.pe == PE_STAIR, num_warps=4,
    )  # fmt: skip
    return output
