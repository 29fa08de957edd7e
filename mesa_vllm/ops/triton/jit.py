"""Shared ``@triton.jit`` helpers of the Mesa kernels (prefill.py, decode.py) and the launch
parameters both launchers derive from their tensors.

Angles: positions are rebased by pos(key 0) so they stay below ~L, computed in fp32 (exact
product + Cody-Waite reduction to [-pi, pi]) and applied neox style on the first
``rotary_dim`` dims: to queries once per tile, to keys as they are loaded.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mesa_vllm.ops.triton import table as tb
from mesa_vllm.support import PE_RULES

# Segment kinds and PE codes (table.py) as the kernels' constants
KIND_MIDDLE: tl.constexpr = tl.constexpr(tb.KIND_MIDDLE)
KIND_STAIR: tl.constexpr = tl.constexpr(tb.KIND_STAIR)
KIND_WEAVE: tl.constexpr = tl.constexpr(tb.KIND_WEAVE)
PE_STAIR: tl.constexpr = tl.constexpr(tb.PE_STAIR)
PE_REROPE: tl.constexpr = tl.constexpr(tb.PE_REROPE)
PE_LEAKY_REROPE: tl.constexpr = tl.constexpr(tb.PE_LEAKY_REROPE)
PE_SELF_EXTEND: tl.constexpr = tl.constexpr(tb.PE_SELF_EXTEND)
PE_STREAMING: tl.constexpr = tl.constexpr(tb.PE_STREAMING)
PE_LM_INFINITE: tl.constexpr = tl.constexpr(tb.PE_LM_INFINITE)
# weave_block's MODE: which products a block of weave keys needs
MODE_FAR: tl.constexpr = tl.constexpr(0)  # every pair far
MODE_NEAR: tl.constexpr = tl.constexpr(1)  # every pair near
MODE_MIXED: tl.constexpr = tl.constexpr(2)  # picked per pair

_C1 = 6.28125  # 2*pi = C1 + C2 + C3, k * C1 exact for k < 2**16
_C2 = float(np.float32(2 * math.pi - _C1))
_TWO_PI_A = tl.constexpr(_C1)
_TWO_PI_B = tl.constexpr(_C2)
_TWO_PI_C = tl.constexpr(2 * math.pi - _C1 - _C2)
_INV_TWO_PI = tl.constexpr(1.0 / (2 * math.pi))
NEG_BIG = tl.constexpr(-1.0e30)

# Kernel arguments that follow the batch, which Triton must not specialise on (it compiles a
# variant per value class: an int equal to 1 or divisible by 16, a pointer 16-byte aligned).
# A serving step's batch is any size, so each new class would compile while requests wait.
# The segment table's columns are views into one packed buffer at offsets that follow the
# number of segments; the decode split sizes follow the batch and its longest sequence.
TABLE_POINTERS = ("TILE_SEG", "TILE_Q0", "SEG_QLO", "SEG_QLEN", "SEG_QABS", "SEG_KIND",
                  "SEG_CHUNK", "SEG_ANCHOR", "SEG_WIDTH", "SEG_REQ")  # fmt: skip
SPLIT_ARGS = ("num_splits", "min_split", "split_div", "split_keys")


_RULE_OF_CODE = {rule.code: rule for rule in PE_RULES.values()}


@triton.constexpr_function
def windowed(pe):
    """PE code of a windowed variant (streaming, lm_infinite): sinks and a window only."""
    return _RULE_OF_CODE[pe].windowed


@triton.constexpr_function
def far_keys_at_zero(pe):
    """PE code of a variant whose far keys sit at position 0, unturned (rerope,
    lm_infinite)."""
    return _RULE_OF_CODE[pe].far_keys_at_zero


# ---------------------------------------------------------------- launch parameters


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def launch_meta(
    query, key_cache, value_cache, inv_freq, rotary_dim, fp8_f16_dot: bool = False
) -> tuple[dict, int, bool]:
    """(the constexprs both kernels take, Hkv, interpreting) of a launch; checks the shapes.

    The dot operands take the query's dtype (fp32 queries: fp32), except with
    ``fp8_f16_dot`` over an fp8 cache and a bf16 query: fp16 then, since fp8 converts to fp16
    in one instruction on sm89+ and to bf16 only through fp16 or fp32 (fp16 keeps more
    mantissa bits than bf16; a query row past fp16's range, 65504, would overflow)."""
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
    interp = interpreting()
    half_dtype = query.dtype in (torch.float16, torch.bfloat16)
    dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(
        query.dtype, tl.float32
    )
    if fp8_f16_dot and half_dtype and key_cache.dtype in FP8_DTYPES:
        dot_dtype = tl.float16
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


def cache_strides(query, key_cache, value_cache) -> dict[str, int]:
    """The query and cache strides, as the kernels name them."""
    names = ("s_qn", "s_qh", "s_kb", "s_kt", "s_kh", "s_vb", "s_vt", "s_vh")
    values = (query.stride(0), query.stride(1), *key_cache.stride()[:3],
              *value_cache.stride()[:3])  # fmt: skip
    return dict(zip(names, values, strict=True))


def scale_pointers(kv_scales, dummy: torch.Tensor) -> dict:
    """K_SCALE / V_SCALE / KV_SCALED of a launch: a quantized cache's (k_scale, v_scale)
    fp32 one-element tensors, or ``dummy`` pointers (never read) and KV_SCALED off."""
    if kv_scales is None:
        return dict(K_SCALE=dummy, V_SCALE=dummy, KV_SCALED=False)
    k_scale, v_scale = kv_scales
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"{name} must be one fp32 value, got {tuple(t.shape)} {t.dtype}")
    return dict(K_SCALE=k_scale, V_SCALE=v_scale, KV_SCALED=True)


def segment_columns(table: tb.SegmentTable) -> dict[str, torch.Tensor]:
    """The per-segment columns of a table, as the kernels name them."""
    return dict(SEG_QLO=table.q_lo, SEG_QLEN=table.q_len, SEG_QABS=table.q_abs,
                SEG_KIND=table.kind, SEG_CHUNK=table.chunk_start, SEG_ANCHOR=table.anchor,
                SEG_WIDTH=table.width, SEG_REQ=table.req)  # fmt: skip


# ---------------------------------------------------------------- device helpers
# Triton kernels take long flat argument lists; one per line would triple this section.
# fmt: off


@triton.jit
def load_segment(SEG_QLO, SEG_QABS, SEG_KIND, SEG_CHUNK, SEG_ANCHOR, SEG_WIDTH, SEG_REQ, seg):
    """Segment seg's columns: (q_lo, q_abs, kind, chunk start s, anchor A, stair width E,
    block-table row req)."""
    return (tl.load(SEG_QLO + seg), tl.load(SEG_QABS + seg), tl.load(SEG_KIND + seg),
            tl.load(SEG_CHUNK + seg), tl.load(SEG_ANCHOR + seg), tl.load(SEG_WIDTH + seg),
            tl.load(SEG_REQ + seg))


@triton.jit
def cos_sin(pos, inv_freq, FAST_TRIG: tl.constexpr):
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
def dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b; UPCAST (interpreter, whose bf16 dot is wrong) multiplies in fp32 after the
    operands were rounded to their dtype, like the tensor cores do."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def mask2(rows_ok, cols, N: tl.constexpr, BLOCK: tl.constexpr):
    """[R, BLOCK] load mask: rows_ok [R] and cols < N; a column mask only when N < BLOCK."""
    if N == BLOCK:
        return tl.broadcast_to(rows_ok[:, None], (rows_ok.shape[0], BLOCK))  # stays vectorized
    return rows_ok[:, None] & (cols < N)[None, :]


@triton.jit
def stair_pos(j, A, E):
    """Stair position of token index j for anchor A and width E (int32)."""
    return tl.where(j >= A, j, A - 1 - tl.maximum(A - 1 - j, 0) // E)


@triton.jit
def online_softmax(acc, l_i, m_i, qk, v_row, kmask, dd, HEAD: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
                    UPCAST: tl.constexpr):
    """One online-softmax step: fold the scores qk [rows, keys] (log2 units, -inf masked) and
    the value rows at v_row [keys] into (acc, l_i, m_i); returns the new triple."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_row[:, None] + dd[None, :], mask=mask2(kmask, dd, HEAD, BLOCK_D), other=0.0)
    acc = acc * alpha[:, None]
    acc = dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, UPCAST, PREC)
    return acc, l_i, m_new


@triton.jit
def attend_block(
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
    j = tl.where((kind == KIND_MIDDLE) & (t >= F), s + t - F, t)
    page = tl.load(BT + req * s_bt + j // PAGE, mask=kmask, other=0).to(tl.int64)
    slot = (j % PAGE).to(tl.int64)
    k_row = K + page * s_kb + slot * s_kt + hkv * s_kh
    hm = mask2(kmask, dh, HALF, BLOCK_HALF)
    k1 = tl.load(k_row[:, None] + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    k2 = tl.load(k_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    kpos = tl.where(kind == KIND_STAIR, stair_pos(t, A, E), t) - base
    if ANGLE_ADD:
        if (kind != KIND_STAIR) | (t0 >= A):
            c0, s0 = cos_sin(tl.zeros([1], dtype=tl.int32) + (t0 - base), inv, FAST_TRIG)
            ck = c0 * ci - s0 * si
            sk = s0 * ci + c0 * si
        else:
            ck, sk = cos_sin(kpos, inv, FAST_TRIG)
    else:
        ck, sk = cos_sin(kpos, inv, FAST_TRIG)
    k1r = (k1 * ck - k2 * sk).to(DOT_DTYPE)
    k2r = (k2 * ck + k1 * sk).to(DOT_DTYPE)
    qk = tl.zeros([q1.shape[0], BLOCK_N], dtype=tl.float32)
    qk = dot(q1, tl.trans(k1r), qk, UPCAST, PREC)
    qk = dot(q2, tl.trans(k2r), qk, UPCAST, PREC)
    if REST > 0:
        dr = tl.arange(0, BLOCK_REST)
        rm = mask2(kmask, dr, REST, BLOCK_REST)
        k3 = tl.load(k_row[:, None] + 2 * HALF + dr[None, :], mask=rm, other=0.0)
        qk = dot(q3, tl.trans(k3.to(DOT_DTYPE)), qk, UPCAST, PREC)
    if MASK:
        qk = tl.where((t[None, :] <= qt[:, None]) & kmask[None, :], qk, float("-inf"))
    v_row = V + page * s_vb + slot * s_vt + hkv * s_vh
    return online_softmax(acc, l_i, m_i, qk, v_row, kmask, dd, HEAD, BLOCK_D, DOT_DTYPE, PREC,
                          UPCAST)


@triton.jit
def angle_table(inv, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr,
                FAST_TRIG: tl.constexpr, ANGLE_ADD: tl.constexpr):
    """cos/sin(i * inv_freq) fp32 [BLOCK_N, BLOCK_HALF] for i < BLOCK_N (zeros if unused)."""
    if ANGLE_ADD:
        return cos_sin(tl.arange(0, BLOCK_N), inv, FAST_TRIG)
    z = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    return z, z


@triton.jit
def scaled_query(
    Q, rows_q, head, row_ok, p, is_stair, s_qn, s_qh, qk_scale, inv_log_L, long_scale,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, LOG_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Scaled, unturned query rows: q1, q2 fp32 [M, BLOCK_HALF], q3 [M, BLOCK_REST] DOT_DTYPE.

    rows_q int32 [M] rows of Q, head int32 [M], p int32 [M] absolute index; the scale is
    qk_scale (softmax scale * log2 e) times, for stair rows, log-n and long_scale (the
    ``long_query_scale`` setting)."""
    dh = tl.arange(0, BLOCK_HALF)
    q_row = Q + rows_q.to(tl.int64) * s_qn + head * s_qh
    hm = mask2(row_ok, dh, HALF, BLOCK_HALF)
    q1 = tl.load(q_row[:, None] + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    q2 = tl.load(q_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    stair_sc = tl.zeros_like(p.to(tl.float32)) + long_scale
    if LOG_N:
        ln = tl.log((p + 1).to(tl.float32)) * inv_log_L
        stair_sc = tl.maximum(ln, 1.0) * long_scale
    sc = tl.where(is_stair, stair_sc, 1.0) * qk_scale
    q3 = tl.zeros([q1.shape[0], BLOCK_REST], dtype=DOT_DTYPE)
    if REST > 0:
        dr = tl.arange(0, BLOCK_REST)
        q3 = tl.load(q_row[:, None] + 2 * HALF + dr[None, :],
                     mask=mask2(row_ok, dr, REST, BLOCK_REST), other=0.0).to(tl.float32)
        q3 = (q3 * sc[:, None]).to(DOT_DTYPE)
    return q1 * sc[:, None], q2 * sc[:, None], q3


@triton.jit
def turn(x1, x2, pos, inv, FAST_TRIG: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Rows x1, x2 fp32 [R, BLOCK_HALF] turned (neox) by angle pos [R] * inv_freq, cast."""
    c, s = cos_sin(pos, inv, FAST_TRIG)
    return (x1 * c - x2 * s).to(DOT_DTYPE), (x2 * c + x1 * s).to(DOT_DTYPE)


@triton.jit
def load_query(
    Q, rows_q, head, row_ok, p, qpos, is_stair, inv, s_qn, s_qh, qk_scale, inv_log_L,
    long_scale,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, LOG_N: tl.constexpr, FAST_TRIG: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Rotated, scaled query rows: q1, q2 [M, BLOCK_HALF], q3 [M, BLOCK_REST] in DOT_DTYPE;
    ``scaled_query`` turned by qpos [M] (rebased position)."""
    q1, q2, q3 = scaled_query(Q, rows_q, head, row_ok, p, is_stair, s_qn, s_qh, qk_scale,
                              inv_log_L, long_scale, HALF, BLOCK_HALF, REST, BLOCK_REST, LOG_N,
                              DOT_DTYPE)
    q1r, q2r = turn(q1, q2, qpos, inv, FAST_TRIG, DOT_DTYPE)
    return q1r, q2r, q3


@triton.jit
def far_qpos(p, W, SINK, LEAKY, FAR_C, GROUP, PE: tl.constexpr):
    """fq(p), fp32 [R], of query indices p int32 [R] (docs/VARIANTS.md; FAR_C: the variant's
    constant, w - w / k for leaky_rerope, w - floor(w / G) for self_extend)."""
    if PE == PE_LEAKY_REROPE:
        pos = p.to(tl.float32) / LEAKY + FAR_C
    elif PE == PE_SELF_EXTEND:
        pos = (p // GROUP).to(tl.float32) + FAR_C
    elif PE == PE_STREAMING:
        pos = tl.minimum(p, SINK + W - 1).to(tl.float32)
    else:  # rerope, lm_infinite: w
        pos = tl.zeros_like(p).to(tl.float32) + W
    return pos


@triton.jit
def weave_block(
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
    online softmax.  MODE_FAR: every pair is far; MODE_NEAR: every pair is near; MODE_MIXED:
    pick per pair (and mask the windowed variants' invisible keys).  CAUSAL masks j > p.

    qn1/qn2 [M, BLOCK_HALF]: the query rotated at p - base_n (near), qf1/qf2 at fq(p) (far),
    q3 the unrotated dims; p int32 [M] query indices.  Near keys turn by j - base_n, far keys
    by fk(j): not at all for rerope / lm_infinite (fk = 0), j / k (leaky_rerope), floor(j / G)
    (self_extend), j (streaming).  ANGLE_ADD: near angles by angle addition as in
    ``attend_block``.
    """
    t = t0 + tl.arange(0, BLOCK_N)
    dh = tl.arange(0, BLOCK_HALF)
    dd = tl.arange(0, BLOCK_D)
    kmask = t < t_end
    j = t + shift
    page = tl.load(BT + req * s_bt + j // PAGE, mask=kmask, other=0).to(tl.int64)
    slot = (j % PAGE).to(tl.int64)
    k_row = K + page * s_kb + slot * s_kt + hkv * s_kh
    hm = mask2(kmask, dh, HALF, BLOCK_HALF)
    k1 = tl.load(k_row[:, None] + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    k2 = tl.load(k_row[:, None] + HALF + dh[None, :], mask=hm, other=0.0).to(tl.float32)
    qk0 = tl.zeros([qn1.shape[0], BLOCK_N], dtype=tl.float32)
    if REST > 0:  # unrotated dims: the same product for near and far
        dr = tl.arange(0, BLOCK_REST)
        rm = mask2(kmask, dr, REST, BLOCK_REST)
        k3 = tl.load(k_row[:, None] + 2 * HALF + dr[None, :], mask=rm, other=0.0)
        qk0 = dot(q3, tl.trans(k3.to(DOT_DTYPE)), qk0, UPCAST, PREC)
    if MODE != MODE_FAR:
        if ANGLE_ADD:
            c0, s0 = cos_sin(tl.zeros([1], dtype=tl.int32) + (t0 + shift - base_n), inv,
                             FAST_TRIG)
            ck = c0 * ci - s0 * si
            sk = s0 * ci + c0 * si
        else:
            ck, sk = cos_sin(j - base_n, inv, FAST_TRIG)
        k1r = (k1 * ck - k2 * sk).to(DOT_DTYPE)
        k2r = (k2 * ck + k1 * sk).to(DOT_DTYPE)
        qk_n = dot(qn1, tl.trans(k1r), qk0, UPCAST, PREC)
        qk_n = dot(qn2, tl.trans(k2r), qk_n, UPCAST, PREC)
    if MODE != MODE_NEAR:
        if far_keys_at_zero(PE):
            k1f = k1.to(DOT_DTYPE)
            k2f = k2.to(DOT_DTYPE)
        else:
            if PE == PE_LEAKY_REROPE:
                ck, sk = cos_sin(j.to(tl.float32) / LEAKY, inv, FAST_TRIG)
            elif PE == PE_SELF_EXTEND:
                ck, sk = cos_sin(j // GROUP, inv, FAST_TRIG)
            else:
                ck, sk = cos_sin(j, inv, FAST_TRIG)
            k1f = (k1 * ck - k2 * sk).to(DOT_DTYPE)
            k2f = (k2 * ck + k1 * sk).to(DOT_DTYPE)
        qk_f = dot(qf1, tl.trans(k1f), qk0, UPCAST, PREC)
        qk_f = dot(qf2, tl.trans(k2f), qk_f, UPCAST, PREC)
    ok = tl.broadcast_to(kmask[None, :], (qn1.shape[0], BLOCK_N))
    if CAUSAL:
        ok = ok & (j[None, :] <= p[:, None])
    if MODE == MODE_FAR:
        qk = qk_f
    elif MODE == MODE_NEAR:
        qk = qk_n
    else:
        near = (p[:, None] - j[None, :]) < W
        qk = tl.where(near, qk_n, qk_f)
        if windowed(PE):  # sinks and the window only
            ok = ok & (near | (j < SINK)[None, :])
    qk = tl.where(ok, qk, float("-inf"))
    v_row = V + page * s_vb + slot * s_vt + hkv * s_vh
    return online_softmax(acc, l_i, m_i, qk, v_row, kmask, dd, HEAD, BLOCK_D, DOT_DTYPE, PREC,
                          UPCAST)


# fmt: on
