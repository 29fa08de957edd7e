"""Middle chunks of a prefill step as one varlen causal attention call (FlashAttention).

A middle-chunk query p of the chunk that starts at s sits at position F + (p - s) and sees
the first chunk (positions 0 .. F - 1) and its own chunk up to itself (positions F ..
F + p - s).  Lay a segment's keys out as [first chunk ; own chunk up to the segment's last
query], rotated at 0 .. nk - 1, and its queries as its own rows: that is one sequence of
varlen causal attention with the causal mask aligned bottom-right (query i of nq sees keys
0 .. nk - nq + i), which is FlashAttention's convention.  The keys are read from the paged
cache (unrotated, written before the attention runs), so a chunk the scheduler splits
across steps finds its earlier keys there, and an fp8 cache is read back as scale x stored.

``middle_prefill`` builds the step's index tensors once (host ints, one copy each);
``middle_attention`` gathers, rotates and attends for one layer, with the rotation and the
attention passed in: ``vllm_rotary`` (vLLM's rotary kernel) and ``flash_attend``
(``flash_attn_varlen_func``) on a GPU, ``mesa_vllm.ops.rope.rotate`` and
``varlen_causal_attention`` (torch, the tests' stand-in for FlashAttention) elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mesa_vllm.plan import Segment

Entry = tuple[int, int, Segment]  # (request, row of the segment's first query, segment)


@dataclass
class MiddlePrefill:
    """The middle segments of one step: ``rows`` int64 [Nq] (rows of the step's q and
    output), ``q_pos`` int64 [Nq]; ``k_slots`` int64 [Nk] (cache slots of every segment's
    keys, segment after segment), ``k_pos`` int64 [Nk]; ``cu_q`` / ``cu_k`` int32 [S + 1]
    (segment boundaries in rows and keys); ``max_q`` / ``max_k`` the longest of each;
    ``fa_version`` the FlashAttention version to call (None: not FlashAttention)."""

    rows: torch.Tensor
    q_pos: torch.Tensor
    k_slots: torch.Tensor
    k_pos: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    fa_version: int | None = None


def take_middle(entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """Split prefill entries into middle-chunk segments and the rest."""
    mids = [e for e in entries if e[2].kind == "middle"]
    return mids, [e for e in entries if e[2].kind != "middle"]


def middle_prefill(
    entries: list[Entry],
    block_table: torch.Tensor,
    block_size: int,
    fa_version: int | None = None,
    device: torch.device | str | None = None,
) -> MiddlePrefill:
    """MiddlePrefill of middle-segment entries; block_table [requests, blocks] int32 (the
    step's, on the device): key index j of request r is slot block_table[r, j // bs] * bs +
    j % bs."""
    device = block_table.device if device is None else device
    rows, q_pos, k_idx, k_req, n_q, n_k = [], [], [], [], [], []
    for r, lo, seg in entries:
        if seg.kind != "middle":
            raise ValueError(f"middle_prefill: a {seg.kind} segment")
        nq, own = seg.q_end - seg.q_start, seg.q_end - seg.chunk_start
        rows.append(np.arange(lo, lo + nq))
        q_pos.append(seg.first + np.arange(seg.q_start - seg.chunk_start, own))
        k_idx.append(np.concatenate([np.arange(seg.first), np.arange(seg.chunk_start, seg.q_end)]))
        k_req.append(np.full(seg.first + own, r))
        n_q.append(nq)
        n_k.append(seg.first + own)

    k_pos = [np.arange(n) for n in n_k]
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]) for n in (n_q, n_k))
    parts = [np.concatenate(x) for x in (rows, q_pos, k_idx, k_req, k_pos)] + [cu_q, cu_k]
    flat = torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(device)  # one copy
    rows_t, q_pos_t, idx, req, k_pos_t, cu_q_t, cu_k_t = flat.split([len(x) for x in parts])
    blocks = block_table[req, idx // block_size].to(torch.int64)
    return MiddlePrefill(
        rows=rows_t,
        q_pos=q_pos_t,
        k_slots=blocks * block_size + idx % block_size,
        k_pos=k_pos_t,
        cu_q=cu_q_t.to(torch.int32),
        cu_k=cu_k_t.to(torch.int32),
        max_q=max(n_q),
        max_k=max(n_k),
        fa_version=fa_version,
    )


Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MiddlePrefill, float], torch.Tensor]


def middle_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    mp: MiddlePrefill,
    scale: float,
    rotate: Rotate,
    attend: Attend,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Outputs [Nq, Hq, D] of the step's middle rows ``mp.rows``.

    query [n, Hq, D] unrotated; key_cache / value_cache [slots, Hkv, D] (flat views of the
    paged cache; fp8 with ``kv_scales`` (k_scale, v_scale), read back as scale x stored);
    keys and values are read in the query's dtype (a cache dtype other than the model's is
    converted); ``rotate(x, positions)`` returns x rotated and may rotate x in place (it gets
    fresh gathers only); ``attend(q, k, v, mp, scale)`` is varlen causal attention over mp's
    segments."""
    k, v = key_cache[mp.k_slots], value_cache[mp.k_slots]
    if kv_scales is not None:
        k = k.to(torch.float32) * kv_scales[0].float()
        v = v.to(torch.float32) * kv_scales[1].float()
    q = rotate(query[mp.rows], mp.q_pos)
    k = rotate(k.to(q.dtype), mp.k_pos)
    return attend(q, k, v.to(q.dtype), mp, scale)


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mp: MiddlePrefill, scale: float
) -> torch.Tensor:
    """FlashAttention's varlen causal attention in torch (fp32): per segment, query i of nq
    reads keys 0 .. nk - nq + i; query head h reads KV head h // (Hq // Hkv)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cu_q, cu_k = mp.cu_q.tolist(), mp.cu_k.tolist()
    group = q.shape[1] // k.shape[1]
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:], strict=False):
        nq, nk = q1 - q0, k1 - k0
        qs = q[q0:q1].float().transpose(0, 1)  # [Hq, nq, D]
        ks = k[k0:k1].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[k0:k1].float().repeat_interleave(group, dim=1).transpose(0, 1)
        allowed = torch.arange(nk, device=q.device)[None, :] <= (
            nk - nq + torch.arange(nq, device=q.device)[:, None]
        )
        scores = (qs @ ks.transpose(1, 2)) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[q0:q1] = (probs @ vs).transpose(0, 1)
    return out.to(q.dtype)


# ---------------------------------------------------------------- the GPU pieces (vLLM's)


def cos_sin_table(inv_freq: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, rotary_dim]: cos | sin of position x inv_freq (fp32, then dtype), the layout of
    vLLM's rotary cache (``RotaryEmbedding``)."""
    t = torch.arange(rows, dtype=torch.float, device=inv_freq.device)
    freqs = torch.einsum("i,j -> ij", t, inv_freq.float())
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def vllm_rotary(cos_sin: torch.Tensor, head_size: int) -> Rotate:
    """Rotate x [n, H, head_size] with vLLM's rotary kernel (neox pairing): in place when x
    is contiguous, else on a contiguous copy; returns the rotated tensor."""
    from vllm import _custom_ops as ops

    def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ops.rotary_embedding(positions, x.view(x.shape[0], -1), None, head_size, cos_sin, True)
        return x

    return rotate


def flash_causal(q, k, v, cu_q, max_q, cu_k, max_k, scale, fa_version, out=None):
    """vLLM's FlashAttention varlen causal attention (bottom-right aligned when a sequence
    has more keys than queries): q [Nq, Hq, D], k / v [Nk, Hkv, D] -> [Nq, Hq, D]."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q,
        k,
        v,
        max_seqlen_q=max_q,
        cu_seqlens_q=cu_q,
        max_seqlen_k=max_k,
        cu_seqlens_k=cu_k,
        softmax_scale=scale,
        causal=True,
        out=out,
        fa_version=fa_version,
    )


def flash_attend(q, k, v, mp: MiddlePrefill, scale: float) -> torch.Tensor:
    """``Attend`` by FlashAttention (version ``mp.fa_version``)."""
    return flash_causal(q, k, v, mp.cu_q, mp.max_q, mp.cu_k, mp.max_k, scale, mp.fa_version)
