"""Triton kernels of Mesa attention over vLLM's paged KV cache (keys cached unrotated).

Every plan segment is bottom-right-aligned causal attention over a *key list*: a middle
segment with queries [qs, qe) reads keys [0, F) then [s, qe); causal and stair segments read
[0, qe).  List index t maps to cache index j = t, or s + (t - F) for t >= F in a middle
segment; query p sees list entries t <= qt(p) (qt = p, or F + p - s in a middle segment).
Positions are monotone along the list with steps 0 or 1: t for causal and middle, the stair
rule for stair.  They are rebased by pos(key 0) so angles stay below ~L, computed in fp32 in
the kernel (exact product + Cody-Waite reduction to [-pi, pi]) and applied to queries once
per tile and to keys as they are loaded, neox style, on the first ``rotary_dim`` dims.

``mesa_prefill`` is a flash-attention kernel over (query tile, KV head) programs, the G query
heads of a KV head packed into the tile's rows; a tile reads only its key list (first chunk +
own chunk for middle segments: O(T (F + C)) work).  ``mesa_decode`` is split-KV
flash-decoding for single-query segments, with a reduction kernel; it does no host sync and
its launch shapes depend only on host ints, so it can be captured in a CUDA graph.  Its
stair keys below the anchor (nearly all keys of a long context) are not turned at all: a
key block spans a few stair positions, so the tile's rows hold the query turned once per
position (relative angle) and each row scores only the keys at its position
(``_stair_block``); the other keys are turned as they are loaded.

Weave segments (docs/VARIANTS.md: rerope, leaky_rerope, self_extend, streaming,
lm_infinite) read the keys [0, p] (sinks [0, S) and the window (p - W, p] for the windowed
``streaming`` / ``lm_infinite``).  A pair (p, j) is near when d = p - j < w, scored with the
query at p and the key at j (both rebased by the program's first near key), else far, with
the query at fq(p) and the key at fk(j) (unrebased: every far position is below ~L by the
variant's construction).  The variant is one per engine, a constexpr ``PE`` of the kernels:
0 for stair (the Mesa specialisations, unchanged), else the kernels branch per segment
between the Mesa loops and the weave ones.  A weave prefill tile splits its key range into
far-only blocks (one key rotation, one QK product; none for ``rerope`` / ``lm_infinite``,
whose far keys sit at 0), near-only blocks (plain RoPE) and the few mixed blocks in between
(both products, picked per pair); windowed tiles visit only the blocks of [0, S) and
[first query - W + 1, last query].  A decode split walks the far keys [0, p - w] (windowed:
the sinks) and then the near keys, so it never needs both products.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mesa_vllm.plan import MesaParams, Segment

KIND_CODES = {"causal": 0, "middle": 1, "stair": 2, "weave": 3}
PE_CODES = {"rerope": 1, "leaky_rerope": 2, "self_extend": 3, "streaming": 4, "lm_infinite": 5}
_LOG2E = 1.4426950408889634
_C1 = 6.28125  # 2*pi = C1 + C2 + C3, k * C1 exact for k < 2**16
_C2 = float(np.float32(2 * math.pi - _C1))
_TWO_PI_A = tl.constexpr(_C1)
_TWO_PI_B = tl.constexpr(_C2)
_TWO_PI_C = tl.constexpr(2 * math.pi - _C1 - _C2)
_INV_TWO_PI = tl.constexpr(1.0 / (2 * math.pi))
_NEG_BIG = tl.constexpr(-1.0e30)
# Decode split sizing per sequence, in-kernel (mesa_decode's split_programs / split_keys /
# min_split_keys): ~512 programs, 512 to 8192 keys per split (H200, benchmarks/
# kernels_h200.md)
DECODE_SPLIT_PROGRAMS = 512
DECODE_SPLIT_KEYS = 8192
DECODE_MIN_SPLIT_KEYS = 512
# Stair positions per decode tile at least (a 128-key block spans <= 4 positions for E >= 43;
# where a block spans more than the tile's rows, its keys are turned instead)
DECODE_STAIR_ROWS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------- host-side tables


@dataclass
class SegmentTable:
    """Segments of one step on the device, int32 [num_segments] each.

    q_lo: row of the segment's first query in the packed query tensor; q_len: its number of
    queries; q_abs: absolute token index of the first query; kind: 0 causal, 1 middle,
    2 stair, 3 weave; chunk_start: s (middle); anchor: A (stair); width: E (stair, one per
    segment: ``Segment.stair_width``, which with ``stair_width: auto`` depends on the
    segment's n; >= 1 for every segment); req: block-table row.
    tile_seg / tile_q0 (int32 [num_tiles]): per prefill program, the segment and the offset of
    its first query (multiples of ``block_q``), longest key list first.  F, L, log_n: Mesa
    scalars; ``stair_width``: the engine's fixed E (1 with auto), which the Mesa kernels do not
    read (they read ``width``), kept for ``_scalars``' callers (benchmarks/decode_lab.py).
    pe: the kernels' ``PE`` constexpr, the engine's variant (``PE_CODES``; 0 for stair, whose
    kernels are the plain Mesa ones), whatever segments the table holds, so that a CUDA graph
    captured on causal decodes replays weave ones correctly.  window (w, or W), sink (S for
    the windowed variants, else 0), leaky_factor (k), group_size (G): the variant's scalars.
    """

    q_lo: torch.Tensor
    q_len: torch.Tensor
    q_abs: torch.Tensor
    kind: torch.Tensor
    chunk_start: torch.Tensor
    anchor: torch.Tensor
    width: torch.Tensor
    req: torch.Tensor
    tile_seg: torch.Tensor
    tile_q0: torch.Tensor
    block_q: int
    first_chunk: int
    stair_width: int
    train_len: int
    log_n: bool
    pe: int = 0
    window: int = 0
    sink: int = 0
    leaky_factor: float = 1.0
    group_size: int = 1

    @property
    def num_segments(self) -> int:
        return self.q_lo.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tile_seg.shape[0]


def build_segment_table(
    entries: Sequence[tuple[int, int, Segment]],
    params: MesaParams,
    block_q: int,
    device: torch.device | str = "cpu",
) -> SegmentTable:
    """Segment table from ``(req, q_lo, segment)`` triples (req: block-table row; q_lo: row of
    ``segment.q_start`` in the packed query tensor).  One host->device copy."""
    n = len(entries)
    cols = np.zeros((8, n), dtype=np.int64)
    for i, (req, q_lo, seg) in enumerate(entries):
        cols[:, i] = (
            q_lo,
            seg.q_end - seg.q_start,
            seg.q_start,
            KIND_CODES[seg.kind],
            seg.chunk_start,
            seg.anchor,
            seg.stair_width,
            req,
        )
    q_len, q_abs, kind, s = cols[1], cols[2], cols[3], cols[4]
    n_tiles = -(-q_len // block_q)
    tile_seg = np.repeat(np.arange(n), n_tiles)
    starts = np.cumsum(n_tiles) - n_tiles
    tile_q0 = (np.arange(tile_seg.size) - np.repeat(starts, n_tiles)) * block_q
    # Work of a tile ~ list index of its last query: schedule the longest first.
    last = q_abs[tile_seg] + np.minimum(tile_q0 + block_q, q_len[tile_seg]) - 1
    F = params.first_chunk
    work = np.where(kind[tile_seg] == 1, F + last - s[tile_seg], last)
    if params.windowed:  # weave tiles read the sinks, the window and their own queries
        short = np.minimum(last, params.sink_tokens + params.window + block_q)
        work = np.where(kind[tile_seg] == 3, short, work)
    order = np.argsort(-work, kind="stable")
    packed = np.concatenate([cols.reshape(-1), tile_seg[order], tile_q0[order]])
    t = torch.from_numpy(packed.astype(np.int32)).to(device, non_blocking=True)
    nt = tile_seg.size
    parts = list(t[: 8 * n].view(8, n)) + [t[8 * n : 8 * n + nt], t[8 * n + nt :]]
    return SegmentTable(
        *parts,
        block_q=block_q,
        first_chunk=F,
        stair_width=params.stair_width or 1,
        train_len=params.train_len,
        log_n=params.log_n_scaling,
        pe=PE_CODES.get(params.pe, 0),
        window=params.window,
        sink=params.sink_tokens if params.windowed else 0,
        leaky_factor=float(params.leaky_factor),
        group_size=params.group_size,
    )


def split_prefill_decode(
    entries: Sequence[tuple[int, int, Segment]],
) -> tuple[list[tuple[int, int, Segment]], list[tuple[int, int, Segment]]]:
    """Split entries into (prefill, decode): decode takes every single-query segment."""
    pre = [e for e in entries if e[2].q_end - e[2].q_start > 1]
    dec = [e for e in entries if e[2].q_end - e[2].q_start == 1]
    return pre, dec


def default_block_q(num_queries_per_kv: int, block_m: int = 128) -> int:
    """Queries per prefill tile: the tile's rows are block_q queries x G heads <= block_m."""
    return max(1, block_m // num_queries_per_kv)


def decode_num_splits(
    max_seq_len: int,
    num_rows: int,
    num_kv_heads: int,
    target_programs: int = 1024,
    keys_per_split: int = 1024,
    min_keys: int = 256,
    max_splits: int = 128,
) -> int:
    """The decode grid's split count from host ints only (CUDA graphs: pass the captured
    batch size and max_model_len).  At least ~``target_programs`` programs and one split per
    ``keys_per_split`` keys, never under ``min_keys`` keys per split, at most ``max_splits``.
    Fitted on an H200 (benchmarks/kernels_h200.md).  It is an upper bound: the
    kernel splits each sequence by its own length (``mesa_decode``'s split_keys /
    split_programs), and given max_seq_len, ``mesa_decode`` launches only the splits that
    sizing can use (``decode_busy_splits``)."""
    want = max(
        -(-target_programs // max(1, num_rows * num_kv_heads)), -(-max_seq_len // keys_per_split)
    )
    return int(max(1, min(want, -(-max_seq_len // min_keys), max_splits)))


def _cdiv(a, b):
    return -(-a // b)


def decode_split_sizing(
    heads: int, block_n: int, min_split_keys: int, split_keys: int | None, split_programs: int
) -> tuple[int, int, int]:
    """(min_split, split_div, split_keys) of ``_split_len`` for a launch of ``heads``
    (segments x KV heads) programs per split: the floor in whole key blocks, the split count
    that gives ~split_programs programs, the cap (split_keys None: the grid's count alone)."""
    min_split = _cdiv(min_split_keys, block_n) * block_n
    if not split_keys:
        return min_split, 1 << 30, 0
    return min_split, max(1, split_programs // heads), split_keys


def split_len_host(
    n_keys: np.ndarray, num_splits: int, min_split: int, split_div: int, split_keys: int,
    block_n: int,
) -> np.ndarray:  # fmt: skip
    """``_split_len`` (the decode kernels' keys per split) on the host, int64 [N] -> [N]."""
    n = np.asarray(n_keys, dtype=np.int64)
    own = np.minimum(_cdiv(n, split_div), split_keys) // block_n * block_n  # rounded down
    per = np.maximum(_cdiv(_cdiv(n, num_splits), block_n) * block_n, own)
    return np.maximum(per, min_split)


@functools.lru_cache(maxsize=64)
def decode_busy_splits(
    max_seq_len: int, num_splits: int, min_split: int, split_div: int, split_keys: int,
    block_n: int,
) -> int:  # fmt: skip
    """The most splits ``_split_len`` keeps busy for a sequence of at most max_seq_len keys
    in a grid of num_splits: the grid a launch needs.  A grid of exactly that many gives every
    sequence the same split length as the larger grid (each split length is a multiple of
    block_n >= n / busy), without the idle programs.

    The split length is a step function of n that only grows, so the busy count peaks at
    the last n before a step: before the per-sequence length gains a block (n = split_div *
    (k * block_n - 1)) or the grid's does (n = num_splits * k * block_n), or at max_seq_len.
    """
    n_max = max(1, max_seq_len)
    k_own = np.arange(1, split_keys // block_n + 2, dtype=np.int64)
    k_grid = np.arange(1, n_max // (num_splits * block_n) + 1, dtype=np.int64)
    n = np.concatenate([split_div * (k_own * block_n - 1), k_grid * num_splits * block_n,
                        [n_max]])  # fmt: skip
    n = n[(n >= 1) & (n <= n_max)]
    per = split_len_host(n, num_splits, min_split, split_div, split_keys, block_n)
    return int(_cdiv(n, per).max())


# ---------------------------------------------------------------- device helpers
# Triton kernels take long flat argument lists; one per line would triple this section.
# fmt: off


@triton.jit
def _cos_sin(pos, inv_freq, FAST_TRIG: tl.constexpr):
    """pos int32 [R] (rebased), inv_freq fp32 [H] -> cos, sin fp32 [R, H] of pos * inv_freq."""
    x = pos.to(tl.float32)[:, None] + tl.zeros_like(inv_freq)[None, :]
    w = inv_freq[None, :] + tl.zeros_like(x)
    ang = x * w
    err = tl.fma(x, w, -ang)  # exact residual of the product
    k = tl.floor(ang * _INV_TWO_PI + 0.5)
    r = tl.fma(k, -_TWO_PI_A, ang)
    r = tl.fma(k, -_TWO_PI_B, r)
    r = tl.fma(k, -_TWO_PI_C, r) + err
    if FAST_TRIG:
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b; UPCAST (interpreter, whose bf16 dot is wrong) multiplies in fp32 after the
    operands were rounded to their dtype, like the tensor cores do."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _mask2(rows_ok, cols, N: tl.constexpr, BLOCK: tl.constexpr):
    """[R, BLOCK] load mask: rows_ok [R] and cols < N; a column mask only when N < BLOCK."""
    if N == BLOCK:
        return tl.broadcast_to(rows_ok[:, None], (rows_ok.shape[0], BLOCK))  # stays vectorized
    return rows_ok[:, None] & (cols < N)[None, :]


@triton.jit
def _stair(j, A, E):
    """Stair position of token index j for anchor A and width E (int32)."""
    return tl.where(j >= A, j, A - 1 - tl.maximum(A - 1 - j, 0) // E)


@triton.jit
def _online_softmax(acc, l_i, m_i, qk, v_row, kmask, dd, HEAD: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
                    UPCAST: tl.constexpr):
    """One online-softmax step: fold the scores qk [rows, keys] (log2 units, -inf masked) and
    the value rows at v_row [keys] into (acc, l_i, m_i); returns the new triple."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_row[:, None] + dd[None, :], mask=_mask2(kmask, dd, HEAD, BLOCK_D), other=0.0)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, UPCAST, PREC)
    return acc, l_i, m_new


@triton.jit
def _attend_block(
    acc, l_i, m_i, q1, q2, q3, qt, t0, t_end,
    K, V, BT, req, kind, F, s, A, E, base, hkv, inv, ci, si,
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ANGLE_ADD: tl.constexpr,
):
    """One BLOCK_N slice [t0, t0 + BLOCK_N) of the key list into the online softmax.

    acc fp32 [M, BLOCK_D]; l_i, m_i fp32 [M] (log2 domain); q1/q2 [M, BLOCK_HALF], q3
    [M, BLOCK_REST] rotated and pre-scaled; qt int32 [M] last visible list index per row;
    list entries >= t_end are not loaded.  MASK applies t <= qt (diagonal slices only).
    ANGLE_ADD: where the slice's positions are contiguous (all but stair keys below the
    anchor), cos/sin come from angle addition with ci/si = cos/sin(i * inv_freq) [BLOCK_N,
    BLOCK_HALF] fp32 (loop-invariant) and one [BLOCK_HALF] cos/sin of the slice's first
    position, instead of BLOCK_N * BLOCK_HALF trig evaluations.
    """
    t = t0 + tl.arange(0, BLOCK_N)
    dh = tl.arange(0, BLOCK_HALF)
    dd = tl.arange(0, BLOCK_D)
    kmask = t < t_end
    j = tl.where((kind == 1) & (t >= F), s + t - F, t)
    page = tl.load(BT + req * s_bt + j // PAGE, mask=kmask, other=0).to(tl.int64)
    slot = (j % PAGE).to(tl.int64)
    k_row = K + page * s_kb + slot * s_kt + hkv * s_kh
    hm = _mask2(kmask, dh, HALF, BLOCK_HALF)
    k1 = tl.load(k_row[:, None] + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    k2 = tl.load(k_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    kpos = tl.where(kind == 2, _stair(t, A, E), t) - base
    if ANGLE_ADD:
        if (kind != 2) | (t0 >= A):
            c0, s0 = _cos_sin(tl.zeros([1], dtype=tl.int32) + (t0 - base), inv, FAST_TRIG)
            ck = c0 * ci - s0 * si
            sk = s0 * ci + c0 * si
        else:
            ck, sk = _cos_sin(kpos, inv, FAST_TRIG)
    else:
        ck, sk = _cos_sin(kpos, inv, FAST_TRIG)
    k1r = (k1 * ck - k2 * sk).to(DOT_DTYPE)
    k2r = (k2 * ck + k1 * sk).to(DOT_DTYPE)
    qk = tl.zeros([q1.shape[0], BLOCK_N], dtype=tl.float32)
    qk = _dot(q1, tl.trans(k1r), qk, UPCAST, PREC)
    qk = _dot(q2, tl.trans(k2r), qk, UPCAST, PREC)
    if REST > 0:
        dr = tl.arange(0, BLOCK_REST)
        rm = _mask2(kmask, dr, REST, BLOCK_REST)
        k3 = tl.load(k_row[:, None] + 2 * HALF + dr[None, :], mask=rm, other=0.0)
        qk = _dot(q3, tl.trans(k3.to(DOT_DTYPE)), qk, UPCAST, PREC)
    if MASK:
        qk = tl.where((t[None, :] <= qt[:, None]) & kmask[None, :], qk, float("-inf"))
    v_row = V + page * s_vb + slot * s_vt + hkv * s_vh
    return _online_softmax(acc, l_i, m_i, qk, v_row, kmask, dd, HEAD, BLOCK_D, DOT_DTYPE, PREC,
                           UPCAST)


@triton.jit
def _angle_table(inv, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 FAST_TRIG: tl.constexpr, ANGLE_ADD: tl.constexpr):
    """cos/sin(i * inv_freq) fp32 [BLOCK_N, BLOCK_HALF] for i < BLOCK_N (zeros if unused)."""
    if ANGLE_ADD:
        return _cos_sin(tl.arange(0, BLOCK_N), inv, FAST_TRIG)
    z = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    return z, z


@triton.jit
def _scaled_query(
    Q, rows_q, head, row_ok, p, is_stair, s_qn, s_qh, qk_scale, inv_log_L,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, LOG_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Scaled, unturned query rows: q1, q2 fp32 [M, BLOCK_HALF], q3 [M, BLOCK_REST] DOT_DTYPE.

    rows_q int32 [M] rows of Q, head int32 [M], p int32 [M] absolute index; the scale is
    qk_scale (softmax scale * log2 e) times log-n for stair rows."""
    dh = tl.arange(0, BLOCK_HALF)
    q_row = Q + rows_q.to(tl.int64) * s_qn + head * s_qh
    hm = _mask2(row_ok, dh, HALF, BLOCK_HALF)
    q1 = tl.load(q_row[:, None] + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    q2 = tl.load(q_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    sc = tl.zeros_like(p.to(tl.float32)) + qk_scale
    if LOG_N:
        ln = tl.log((p + 1).to(tl.float32)) * inv_log_L
        sc = tl.where(is_stair, tl.maximum(ln, 1.0), 1.0) * qk_scale
    q3 = tl.zeros([q1.shape[0], BLOCK_REST], dtype=DOT_DTYPE)
    if REST > 0:
        dr = tl.arange(0, BLOCK_REST)
        q3 = tl.load(q_row[:, None] + 2 * HALF + dr[None, :],
                     mask=_mask2(row_ok, dr, REST, BLOCK_REST), other=0.0).to(tl.float32)
        q3 = (q3 * sc[:, None]).to(DOT_DTYPE)
    return q1 * sc[:, None], q2 * sc[:, None], q3


@triton.jit
def _turn(x1, x2, pos, inv, FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Rows x1, x2 fp32 [R, BLOCK_HALF] turned (neox) by angle pos [R] * inv_freq, cast."""
    c, s = _cos_sin(pos, inv, FAST_TRIG)
    return (x1 * c - x2 * s).to(DOT_DTYPE), (x2 * c + x1 * s).to(DOT_DTYPE)


@triton.jit
def _load_query(
    Q, rows_q, head, row_ok, p, qpos, is_stair, inv, s_qn, s_qh, qk_scale, inv_log_L,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, LOG_N: tl.constexpr, FAST_TRIG: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Rotated, scaled query rows: q1, q2 [M, BLOCK_HALF], q3 [M, BLOCK_REST] in DOT_DTYPE;
    ``_scaled_query`` turned by qpos [M] (rebased position)."""
    q1, q2, q3 = _scaled_query(Q, rows_q, head, row_ok, p, is_stair, s_qn, s_qh, qk_scale,
                               inv_log_L, HALF, BLOCK_HALF, REST, BLOCK_REST, LOG_N, DOT_DTYPE)
    q1r, q2r = _turn(q1, q2, qpos, inv, FAST_TRIG, DOT_DTYPE)
    return q1r, q2r, q3


@triton.jit
def _far_qpos(p, W, SINK, LEAKY, FAR_C, GROUP, PE: tl.constexpr):
    """fq(p), fp32 [R], of query indices p int32 [R] (docs/VARIANTS.md; FAR_C: the variant's
    constant, w - w / k for leaky_rerope, w - floor(w / G) for self_extend)."""
    if PE == 2:
        pos = p.to(tl.float32) / LEAKY + FAR_C
    elif PE == 3:
        pos = (p // GROUP).to(tl.float32) + FAR_C
    elif PE == 4:
        pos = tl.minimum(p, SINK + W - 1).to(tl.float32)
    else:  # rerope, lm_infinite: w
        pos = tl.zeros_like(p).to(tl.float32) + W
    return pos


@triton.jit
def _weave_block(
    acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, t_end, shift, base_n,
    K, V, BT, req, hkv, inv, ci, si, W, SINK, LEAKY, GROUP,
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr,
    PE: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ANGLE_ADD: tl.constexpr,
):
    """Keys j = t + shift for t in [t0, t0 + BLOCK_N), t < t_end, of a weave segment into the
    online softmax.  MODE 0: every pair is far; 1: every pair is near; 2: mixed, pick per pair
    (and mask the windowed variants' invisible keys).  CAUSAL masks j > p.

    qn1/qn2 [M, BLOCK_HALF]: the query rotated at p - base_n (near), qf1/qf2 at fq(p) (far),
    q3 the unrotated dims; p int32 [M] query indices.  Near keys turn by j - base_n, far keys
    by fk(j): not at all for rerope / lm_infinite (fk = 0), j / k (leaky_rerope), floor(j / G)
    (self_extend), j (streaming).  ANGLE_ADD: near angles by angle addition as in
    ``_attend_block``.
    """
    t = t0 + tl.arange(0, BLOCK_N)
    dh = tl.arange(0, BLOCK_HALF)
    dd = tl.arange(0, BLOCK_D)
    kmask = t < t_end
    j = t + shift
    page = tl.load(BT + req * s_bt + j // PAGE, mask=kmask, other=0).to(tl.int64)
    slot = (j % PAGE).to(tl.int64)
    k_row = K + page * s_kb + slot * s_kt + hkv * s_kh
    hm = _mask2(kmask, dh, HALF, BLOCK_HALF)
    k1 = tl.load(k_row[:, None] + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    k2 = tl.load(k_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    qk0 = tl.zeros([qn1.shape[0], BLOCK_N], dtype=tl.float32)
    if REST > 0:  # unrotated dims: the same product for near and far
        dr = tl.arange(0, BLOCK_REST)
        rm = _mask2(kmask, dr, REST, BLOCK_REST)
        k3 = tl.load(k_row[:, None] + 2 * HALF + dr[None, :], mask=rm, other=0.0)
        qk0 = _dot(q3, tl.trans(k3.to(DOT_DTYPE)), qk0, UPCAST, PREC)
    if MODE != 0:
        if ANGLE_ADD:
            c0, s0 = _cos_sin(tl.zeros([1], dtype=tl.int32) + (t0 + shift - base_n), inv,
                              FAST_TRIG)
            ck = c0 * ci - s0 * si
            sk = s0 * ci + c0 * si
        else:
            ck, sk = _cos_sin(j - base_n, inv, FAST_TRIG)
        k1r = (k1 * ck - k2 * sk).to(DOT_DTYPE)
        k2r = (k2 * ck + k1 * sk).to(DOT_DTYPE)
        qk_n = _dot(qn1, tl.trans(k1r), qk0, UPCAST, PREC)
        qk_n = _dot(qn2, tl.trans(k2r), qk_n, UPCAST, PREC)
    if MODE != 1:
        if PE == 1:
            k1f = k1.to(DOT_DTYPE)
            k2f = k2.to(DOT_DTYPE)
        elif PE == 5:
            k1f = k1.to(DOT_DTYPE)
            k2f = k2.to(DOT_DTYPE)
        else:
            if PE == 2:
                ck, sk = _cos_sin(j.to(tl.float32) / LEAKY, inv, FAST_TRIG)
            elif PE == 3:
                ck, sk = _cos_sin(j // GROUP, inv, FAST_TRIG)
            else:
                ck, sk = _cos_sin(j, inv, FAST_TRIG)
            k1f = (k1 * ck - k2 * sk).to(DOT_DTYPE)
            k2f = (k2 * ck + k1 * sk).to(DOT_DTYPE)
        qk_f = _dot(qf1, tl.trans(k1f), qk0, UPCAST, PREC)
        qk_f = _dot(qf2, tl.trans(k2f), qk_f, UPCAST, PREC)
    ok = tl.broadcast_to(kmask[None, :], (qn1.shape[0], BLOCK_N))
    if CAUSAL:
        ok = ok & (j[None, :] <= p[:, None])
    if MODE == 0:
        qk = qk_f
    elif MODE == 1:
        qk = qk_n
    else:
        near = (p[:, None] - j[None, :]) < W
        qk = tl.where(near, qk_n, qk_f)
        if PE >= 4:  # streaming, lm_infinite: sinks and the window only
            ok = ok & (near | (j < SINK)[None, :])
    qk = tl.where(ok, qk, float("-inf"))
    v_row = V + page * s_vb + slot * s_vt + hkv * s_vh
    return _online_softmax(acc, l_i, m_i, qk, v_row, kmask, dd, HEAD, BLOCK_D, DOT_DTYPE, PREC,
                           UPCAST)


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
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q1, q2, q3, qt, t0, t_end, K, V, BT, req, kind, F, s, A, E, base,
            hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, REST,
            BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, False, FAST_TRIG, DOT_DTYPE, PREC, UPCAST,
            ANGLE_ADD)
    for t0 in range(n_full, t_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q1, q2, q3, qt, t0, t_end, K, V, BT, req, kind, F, s, A, E, base,
            hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, REST,
            BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, True, FAST_TRIG, DOT_DTYPE, PREC, UPCAST,
            ANGLE_ADD)
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
    if PE >= 4:
        far_hi = tl.minimum(far_end, SINK)
    for t0 in range(0, far_hi, BLOCK_N):
        acc, l_i, m_i = _weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, far_hi, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, 0, False, PE,
            FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
    for t0 in range(far_end, tl.minimum(near_start, t_end), BLOCK_N):
        acc, l_i, m_i = _weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, t_end, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, 2, True, PE,
            FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
    for t0 in range(near_start, n_full, BLOCK_N):
        acc, l_i, m_i = _weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, t_end, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, 1, False, PE,
            FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
    for t0 in range(tl.maximum(near_start, n_full), t_end, BLOCK_N):
        acc, l_i, m_i = _weave_block(
            acc, l_i, m_i, qn1, qn2, qf1, qf2, q3, p, t0, t_end, 0, far_end, K, V, BT, req,
            hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
            HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, 1, True, PE,
            FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
    return acc, l_i, m_i


# ---------------------------------------------------------------- kernels


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, BT, TILE_SEG, TILE_Q0,
    SEG_QLO, SEG_QLEN, SEG_QABS, SEG_KIND, SEG_CHUNK, SEG_ANCHOR, SEG_WIDTH, SEG_REQ,
    INV_FREQ, qk_scale, inv_log_L, F, W, SINK, LEAKY, FAR_C, GROUP,
    s_qn, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_on, s_oh, s_bt,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    LOG_N: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ANGLE_ADD: tl.constexpr, PE: tl.constexpr,
):
    tile = tl.program_id(0)
    hkv = tl.program_id(1)
    seg = tl.load(TILE_SEG + tile)
    q0 = tl.load(TILE_Q0 + tile)
    q_lo = tl.load(SEG_QLO + seg)
    q_len = tl.load(SEG_QLEN + seg)
    q_abs = tl.load(SEG_QABS + seg)
    kind = tl.load(SEG_KIND + seg)
    s = tl.load(SEG_CHUNK + seg)
    A = tl.load(SEG_ANCHOR + seg)
    E = tl.load(SEG_WIDTH + seg)
    req = tl.load(SEG_REQ + seg)

    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // G
    head = hkv * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (qi < q_len)
    p = q_abs + qi
    qt = tl.where(kind == 1, F + p - s, p)  # list index of the query = its last key
    base = tl.where(kind == 2, A - 1 - tl.maximum(A - 1, 0) // E, 0)  # pos(key 0)
    qpos = tl.where(kind == 2, _stair(p, A, E), qt) - base
    inv = tl.load(INV_FREQ + tl.arange(0, BLOCK_HALF), mask=tl.arange(0, BLOCK_HALF) < HALF,
                  other=0.0)
    if PE == 0:
        q1, q2, q3 = _load_query(Q, q_lo + qi, head, row_ok, p, qpos, kind == 2, inv, s_qn,
                                 s_qh, qk_scale, inv_log_L, HALF, BLOCK_HALF, REST, BLOCK_REST,
                                 LOG_N, FAST_TRIG, DOT_DTYPE)
    else:
        weave = kind == 3
        # first key that is not far for every row: the tile's near rebase
        far_end = (tl.maximum(q_abs + q0 - W + 1, 0) // BLOCK_N) * BLOCK_N
        qpos = tl.where(weave, p - far_end, qpos)
        q1, q2, q3 = _load_query(Q, q_lo + qi, head, row_ok, p, qpos, kind >= 2, inv, s_qn,
                                 s_qh, qk_scale, inv_log_L, HALF, BLOCK_HALF, REST, BLOCK_REST,
                                 LOG_N, FAST_TRIG, DOT_DTYPE)

    p_first = q_abs + q0
    p_last = q_abs + tl.minimum(q0 + BLOCK_Q, q_len) - 1
    qt_first = tl.where(kind == 1, F + p_first - s, p_first)
    t_end = tl.where(kind == 1, F + p_last - s, p_last) + 1

    ci, si = _angle_table(inv, BLOCK_N, BLOCK_HALF, FAST_TRIG, ANGLE_ADD)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG_BIG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PE == 0:
        acc, l_i, m_i = _mesa_tile(
            acc, l_i, m_i, q1, q2, q3, qt, qt_first, t_end, K, V, BT, req, kind, F, s, A, E,
            base, hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF,
            REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, FAST_TRIG, DOT_DTYPE, PREC, UPCAST,
            ANGLE_ADD)
    else:
        if weave:
            qf1, qf2, q3f = _load_query(
                Q, q_lo + qi, head, row_ok, p, _far_qpos(p, W, SINK, LEAKY, FAR_C, GROUP, PE),
                kind >= 2, inv, s_qn, s_qh, qk_scale, inv_log_L, HALF, BLOCK_HALF, REST, BLOCK_REST,
                LOG_N, FAST_TRIG, DOT_DTYPE)
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
    dd = tl.arange(0, BLOCK_D)
    o_row = Out + (q_lo + qi).to(tl.int64) * s_on + head * s_oh
    tl.store(o_row[:, None] + dd[None, :], out.to(Out.dtype.element_ty),
             mask=_mask2(row_ok, dd, HEAD, BLOCK_D))


@triton.jit
def _mesa_n_keys(kind, p_abs, F, s):
    """Length of a Mesa segment's key list for its query at absolute index p_abs: F + p - s + 1
    for a middle segment (first chunk + own chunk), else p + 1."""
    return tl.where(kind == 1, F + p_abs - s, p_abs) + 1


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
    whole = t >= t0  # every key of the block is in the list
    page = tl.load(BT + req * s_bt + t // PAGE).to(tl.int64)
    slot = (t % PAGE).to(tl.int64)
    k_row = K + page * s_kb + slot * s_kt + hkv * s_kh
    hm = _mask2(whole, dh, HALF, BLOCK_HALF)
    k1 = tl.load(k_row[:, None] + dh[None, :], mask=hm, other=0.0).to(DOT_DTYPE)
    k2 = tl.load(k_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(DOT_DTYPE)
    qk = tl.zeros([q1r.shape[0], BLOCK_N], dtype=tl.float32)
    qk = _dot(q1r, tl.trans(k1), qk, UPCAST, PREC)
    qk = _dot(q2r, tl.trans(k2), qk, UPCAST, PREC)
    if REST > 0:
        dr = tl.arange(0, BLOCK_REST)
        k3 = tl.load(k_row[:, None] + 2 * HALF + dr[None, :],
                     mask=_mask2(whole, dr, REST, BLOCK_REST), other=0.0)
        qk = _dot(q3, tl.trans(k3.to(DOT_DTYPE)), qk, UPCAST, PREC)
    v_k = _stair(t, A, E) - pos0
    qk = tl.where(v_r[:, None] == v_k[None, :], qk, float("-inf"))
    v_row = V + page * s_vb + slot * s_vt + hkv * s_vh
    return _online_softmax(acc, l_i, m_i, qk, v_row, whole, dd, HEAD, BLOCK_D, DOT_DTYPE, PREC,
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


@triton.jit
def _decode_kernel(
    Q, K, V, BT, M_WS, L_WS, ACC_WS,
    SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK, SEG_ANCHOR, SEG_WIDTH, SEG_REQ, INV_FREQ,
    qk_scale, inv_log_L, F, W, SINK, LEAKY, FAR_C, GROUP, num_splits, min_split,
    split_div, split_keys,
    s_qn, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt,
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
    q_lo = tl.load(SEG_QLO + seg)
    p_abs = tl.load(SEG_QABS + seg)
    kind = tl.load(SEG_KIND + seg)
    s = tl.load(SEG_CHUNK + seg)
    A = tl.load(SEG_ANCHOR + seg)
    E = tl.load(SEG_WIDTH + seg)
    req = tl.load(SEG_REQ + seg)

    rows = tl.arange(0, BLOCK_G)
    p = tl.zeros([BLOCK_G], dtype=tl.int32) + p_abs
    qt = tl.where(kind == 1, F + p - s, p)
    base = tl.where(kind == 2, A - 1 - tl.maximum(A - 1, 0) // E, 0)
    qpos = tl.where(kind == 2, _stair(p, A, E), qt) - base
    inv = tl.load(INV_FREQ + tl.arange(0, BLOCK_HALF), mask=tl.arange(0, BLOCK_HALF) < HALF,
                  other=0.0)
    ci, si = _angle_table(inv, BLOCK_N, BLOCK_HALF, FAST_TRIG, ANGLE_ADD)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) + _NEG_BIG
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    n_keys = _mesa_n_keys(kind, p_abs, F, s)
    if PE == 0:
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
            q1, q2, q3 = _scaled_query(Q, q_lo + rows * 0, hkv * G + g_r, g_r < G, p, kind == 2,
                                       s_qn, s_qh, qk_scale, inv_log_L, HALF, BLOCK_HALF, REST,
                                       BLOCK_REST, LOG_N, DOT_DTYPE)
            stair_end = lo
            if TURN_QUERY:
                # Whole key blocks below the anchor, while a block spans <= NV stair positions
                few = (kind == 2) & ((BLOCK_N - 1) // E + 2 <= NV)
                n_stair = tl.where(few, tl.maximum(tl.minimum(A, hi) - lo, 0) // BLOCK_N, 0)
                stair_end = lo + n_stair * BLOCK_N
                q_stair = _stair(p_abs, A, E)
                qa, qb = _turn(q1, q2, -v_r, inv, FAST_TRIG, tl.float32)
                # the query turned per block, in one loop (Triton pipelines only the
                # innermost loop: a turn shared by a run of blocks, a nested loop, lost on
                # the H200, benchmarks/decode_experiments_h200.md, experiments 6 and 7)
                for t0 in range(lo, stair_end, BLOCK_N):
                    pos0 = _stair(t0, A, E)
                    q1s, q2s = _turn(qa, qb, tl.zeros([1], dtype=tl.int32) + (q_stair - pos0),
                                     inv, FAST_TRIG, DOT_DTYPE)
                    acc, l_i, m_i = _stair_block(
                        acc, l_i, m_i, q1s, q2s, q3, v_r, t0, pos0, K, V, BT, req, A, E, hkv,
                        s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF, BLOCK_HALF, REST,
                        BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, DOT_DTYPE, PREC, UPCAST)
            q1r, q2r = _turn(q1, q2, qpos, inv, FAST_TRIG, DOT_DTYPE)
            for t0 in range(stair_end, hi, BLOCK_N):
                acc, l_i, m_i = _attend_block(
                    acc, l_i, m_i, q1r, q2r, q3, tl.where(v_r == 0, qt, -1), t0, hi, K, V, BT,
                    req, kind, F, s, A, E, base, hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt,
                    s_vh, s_bt, HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N,
                    True, FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
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
        weave = kind == 3
        fe_j = tl.maximum(p_abs - W + 1, 0)
        if PE >= 4:
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
        q1, q2, q3 = _load_query(Q, q_lo + rows * 0, head, row_ok, p, qpos, kind >= 2, inv,
                                 s_qn, s_qh, qk_scale, inv_log_L, HALF, BLOCK_HALF, REST,
                                 BLOCK_REST, LOG_N, FAST_TRIG, DOT_DTYPE)
        if weave:
            qf1, qf2, q3f = _load_query(
                Q, q_lo + rows * 0, head, row_ok, p,
                _far_qpos(p, W, SINK, LEAKY, FAR_C, GROUP, PE), kind >= 2, inv, s_qn, s_qh,
                qk_scale, inv_log_L, HALF, BLOCK_HALF, REST, BLOCK_REST, LOG_N, FAST_TRIG,
                DOT_DTYPE)
            far_hi = tl.minimum(hi, fe_l)
            for t0 in range(lo, far_hi, BLOCK_N):
                acc, l_i, m_i = _weave_block(
                    acc, l_i, m_i, q1, q2, qf1, qf2, q3, p, t0, far_hi, 0, fe_j, K, V, BT, req,
                    hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                    s_bt, HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, 0,
                    False, PE, FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
            for t0 in range(tl.maximum(lo, fe_l), hi, BLOCK_N):
                acc, l_i, m_i = _weave_block(
                    acc, l_i, m_i, q1, q2, qf1, qf2, q3, p, t0, hi, shift, fe_j, K, V, BT, req,
                    hkv, inv, ci, si, W, SINK, LEAKY, GROUP, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                    s_bt, HALF, BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, 1,
                    False, PE, FAST_TRIG, DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
        else:
            for t0 in range(lo, hi, BLOCK_N):
                acc, l_i, m_i = _attend_block(
                    acc, l_i, m_i, q1, q2, q3, qt, t0, hi, K, V, BT, req, kind, F, s, A, E,
                    base, hkv, inv, ci, si, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, HALF,
                    BLOCK_HALF, REST, BLOCK_REST, HEAD, BLOCK_D, PAGE, BLOCK_N, True, FAST_TRIG,
                    DOT_DTYPE, PREC, UPCAST, ANGLE_ADD)
        _store_split(M_WS, L_WS, ACC_WS, idx, m_i, l_i, acc, row_ok, BLOCK_D)


@triton.jit
def _decode_reduce_kernel(
    Out, M_WS, L_WS, ACC_WS, SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK, F, num_splits, min_split,
    split_div, split_keys,
    s_on, s_oh,
    HEAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    BUSY_ONLY: tl.constexpr,
):
    """Merge the splits of one (segment, head); BUSY_ONLY (Mesa segments): only the splits
    ``_decode_kernel`` ran, the others' workspace is stale."""
    seg = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    n_busy = num_splits
    if BUSY_ONLY:
        n_keys = _mesa_n_keys(tl.load(SEG_KIND + seg), tl.load(SEG_QABS + seg), F,
                              tl.load(SEG_CHUNK + seg))
        per_split = _split_len(n_keys, num_splits, min_split, split_div, split_keys, BLOCK_N)
        n_busy = tl.minimum(tl.cdiv(n_keys, per_split), num_splits)
    ok = sp < n_busy
    base = (seg * tl.num_programs(1) + head) * num_splits
    m = tl.load(M_WS + base + sp, mask=ok, other=_NEG_BIG)
    l_s = tl.load(L_WS + base + sp, mask=ok, other=0.0)
    w = tl.where(ok, tl.exp2(m - tl.max(m, 0)), 0.0)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.load(ACC_WS + (base + sp).to(tl.int64)[:, None] * BLOCK_D + dd[None, :],
                  mask=ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    q_lo = tl.load(SEG_QLO + seg)
    tl.store(Out + q_lo.to(tl.int64) * s_on + head * s_oh + dd, out.to(Out.dtype.element_ty),
             mask=dd < HEAD)


# fmt: on
# ---------------------------------------------------------------- launchers


def _common(query, key_cache, value_cache, inv_freq, rotary_dim):
    n, Hq, D = query.shape
    Hkv = key_cache.shape[2]
    if Hq % Hkv or key_cache.shape[3] != D or value_cache.shape != key_cache.shape:
        raise ValueError(f"shapes: query {tuple(query.shape)}, cache {tuple(key_cache.shape)}")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and caches need a contiguous last dimension")
    rd = rotary_dim if rotary_dim is not None else 2 * inv_freq.shape[0]
    if rd % 2 or rd > D or inv_freq.shape[0] != rd // 2 or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be fp32 [rotary_dim // 2] (rotary_dim={rd}, D={D})")
    half, rest = rd // 2, D - rd
    interp = _interpreting()
    half_dtype = query.dtype in (torch.float16, torch.bfloat16)
    dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(
        query.dtype, tl.float32
    )
    return (
        dict(
            G=Hq // Hkv,
            HALF=half,
            BLOCK_HALF=max(16, triton.next_power_of_2(half)),
            REST=rest,
            BLOCK_REST=max(16, triton.next_power_of_2(max(rest, 1))),
            HEAD=D,
            BLOCK_D=max(16, triton.next_power_of_2(D)),
            PAGE=key_cache.shape[1],
            DOT_DTYPE=dot_dtype,
            PREC="ieee" if not half_dtype else "tf32",
            UPCAST=interp,
        ),
        Hkv,
        interp,
    )


def _strides(query, key_cache, value_cache) -> tuple[int, ...]:
    return (query.stride(0), query.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3])


def _kernel_scalars(table: SegmentTable, scale: float) -> tuple:
    """``_scalars`` without E: the Mesa kernels read E per segment (``SegmentTable.width``)."""
    sc = _scalars(table, scale)
    return sc[:3] + sc[4:]


def _scalars(table: SegmentTable, scale: float) -> tuple:
    """qk_scale (softmax scale * log2 e), 1 / ln L, F, E, then the weave scalars: w, S, k, the
    far-query constant (w - w / k for leaky_rerope, w - floor(w / G) for self_extend) and G."""
    w, k, g = table.window, table.leaky_factor, table.group_size
    far_c = {2: w - w / k, 3: float(w - w // g)}.get(table.pe, 0.0)
    return (
        scale * _LOG2E, 1.0 / math.log(table.train_len), table.first_chunk, table.stair_width,
        w, table.sink, k, far_c, g,
    )  # fmt: skip


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
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fast_trig: bool | None = None,
    angle_add: bool = True,
) -> torch.Tensor:
    """Mesa attention of every query row listed in ``table`` (any segment kinds and lengths).

    query [n, Hq, D] fp16/bf16/fp32, unrotated; key_cache / value_cache [num_blocks,
    block_size, Hkv, D] (keys unrotated, Hq % Hkv == 0); block_table int32 [num_reqs,
    max_blocks]; inv_freq fp32 [rotary_dim // 2] (neox pairing, rotary_dim <= D, default
    2 * len(inv_freq)); output [n, Hq, D] (rows not in ``table`` are left untouched).
    Defaults (BLOCK_N 64, 8 warps, 2 stages, fast trig, angle addition) come from the H200
    sweep in benchmarks/kernels_h200.md; tiles of 256 rows / 16 warps were 3% faster there.
    Returns ``output``.
    """
    if table.num_tiles == 0:
        return output
    meta, Hkv, interp = _common(query, key_cache, value_cache, inv_freq, rotary_dim)
    block_m = max(16, triton.next_power_of_2(table.block_q * meta["G"]))
    if block_n is None:
        wide = meta["BLOCK_D"] > 128 or query.dtype == torch.float32
        block_n = 16 if interp else (32 if wide else 64)
    seg = (table.q_lo, table.q_len, table.q_abs, table.kind, table.chunk_start, table.anchor,
           table.width)  # fmt: skip
    _prefill_kernel[(table.num_tiles, Hkv)](
        query, key_cache, value_cache, output, block_table, table.tile_seg, table.tile_q0,
        *seg, table.req, inv_freq, *_kernel_scalars(table, scale),
        *_strides(query, key_cache, value_cache), output.stride(0), output.stride(1),
        block_table.stride(0),
        BLOCK_Q=table.block_q, BLOCK_M=block_m, BLOCK_N=block_n, LOG_N=table.log_n,
        FAST_TRIG=not interp if fast_trig is None else fast_trig, ANGLE_ADD=angle_add,
        PE=table.pe,
        num_warps=num_warps or (4 if block_m <= 64 else 8), num_stages=num_stages or 2,
        **meta,
    )  # fmt: skip
    return output


def check_decode_launch(
    block_n: int | None = None,
    num_warps: int | None = None,
    tile_rows: int = 16,
    **_: object,
) -> None:
    """ValueError naming the first ``mesa_decode`` launch option the kernel cannot take
    (tile sizes and warp counts are powers of 2; None: the default)."""
    for name, value, least in (("block_n", block_n, 16), ("num_warps", num_warps, 1),
                               ("tile_rows", tile_rows, 16)):  # fmt: skip
        if value is not None and (value < least or value & (value - 1)):
            raise ValueError(f"{name}={value} is not a power of 2 >= {least}")


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
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fast_trig: bool | None = None,
    angle_add: bool = False,
    min_split_keys: int | None = None,
    turn_query: bool = True,
    tile_rows: int = 16,
    split_keys: int | None = DECODE_SPLIT_KEYS,
    split_programs: int = DECODE_SPLIT_PROGRAMS,
    tail_first: bool = True,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Split-KV decode: every segment of ``table`` must hold exactly one query.

    Shapes as ``mesa_prefill``; ``num_splits`` a host int (``decode_num_splits``): the grid's
    split count at most; max_seq_len (a host int, e.g. max_model_len; None: unknown) lets the
    launch shrink the grid to the splits a sequence that long can keep busy
    (``decode_busy_splits``), which drops idle programs and changes no split.  workspace:
    (m, l fp32 [num_segments * Hq * num_splits], acc fp32 [num_segments * Hq * num_splits,
    BLOCK_D]) or None to allocate.

    Launch options (defaults from the H200 sweeps in benchmarks/kernels_h200.md;
    MESA_VLLM_DECODE_KERNEL overrides them in the engine):

    * block_n (128 for fp16/bf16), num_warps (4), num_stages (3).
    * turn_query: stair keys below the anchor are scored with the query turned per stair
      position (``_stair_block``); False turns every key instead.
    * tile_rows: decode tile rows at least (the G heads, padded, x the stair positions NV).
    * tail_first (on): a sequence's busy splits start last to first, so the split holding
      the keys turned as loaded (the slowest) does not start last.
    * Split sizing: each sequence gets enough splits for ~split_programs programs, of at most
      split_keys keys (whole key blocks, rounded down), at least min_split_keys keys (512 on
      the GPU, one key block under the interpreter), within the grid; split_keys None: the
      grid's count alone (min_split_keys still holds).  Splits past a sequence's own count
      return at once (Mesa segments).

    No host sync, grid from host ints: CUDA-graph safe when ``table`` and ``workspace`` live
    in persistent buffers.  Returns ``output``.
    """
    check_decode_launch(block_n=block_n, num_warps=num_warps, tile_rows=tile_rows)
    n_seg = table.num_segments
    if n_seg == 0:
        return output
    meta, Hkv, interp = _common(query, key_cache, value_cache, inv_freq, rotary_dim)
    Hq = query.shape[1]
    if block_n is None:
        block_n = 16 if interp else (32 if query.dtype == torch.float32 else 128)
    if min_split_keys is None:
        min_split_keys = block_n if interp else DECODE_MIN_SPLIT_KEYS
    sizing = (*decode_split_sizing(n_seg * Hkv, block_n, min_split_keys, split_keys,
                                   split_programs), block_n)  # fmt: skip
    if max_seq_len is not None:
        num_splits = min(num_splits, decode_busy_splits(max_seq_len, num_splits, *sizing))
    splits = (num_splits, *sizing[:3])
    if workspace is None:
        size, dev = n_seg * Hq * num_splits, query.device
        workspace = (
            torch.empty(size, dtype=torch.float32, device=dev),
            torch.empty(size, dtype=torch.float32, device=dev),
            torch.empty(size, meta["BLOCK_D"], dtype=torch.float32, device=dev),
        )
    # tile rows: the G heads (padded) x at least DECODE_STAIR_ROWS stair positions (a weave
    # engine's decode has no stair rows: the G heads only)
    g_pad = triton.next_power_of_2(meta["G"])
    block_g = max(tile_rows, g_pad * (DECODE_STAIR_ROWS if table.pe == 0 else 1))
    seg = (table.q_lo, table.q_abs, table.kind, table.chunk_start, table.anchor, table.width,
           table.req)  # fmt: skip
    _decode_kernel[(n_seg, Hkv, num_splits)](
        query, key_cache, value_cache, block_table, *workspace, *seg, inv_freq,
        *_kernel_scalars(table, scale), *splits,
        *_strides(query, key_cache, value_cache), block_table.stride(0),
        G_PAD=g_pad, NV=block_g // g_pad, BLOCK_G=block_g, BLOCK_N=block_n, LOG_N=table.log_n,
        FAST_TRIG=not interp if fast_trig is None else fast_trig, ANGLE_ADD=angle_add,
        PE=table.pe, TURN_QUERY=turn_query, TAIL_FIRST=bool(tail_first),
        num_warps=num_warps or 4, num_stages=num_stages or 3, **meta,
    )  # fmt: skip
    _decode_reduce_kernel[(n_seg, Hq)](
        output, *workspace, table.q_lo, table.q_abs, table.kind, table.chunk_start,
        table.first_chunk, *splits, output.stride(0), output.stride(1),
        HEAD=meta["HEAD"], BLOCK_D=meta["BLOCK_D"],
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_N=block_n,
        BUSY_ONLY=table.pe == 0, num_warps=4,
    )  # fmt: skip
    return output
