"""Torch path of the weave-PE variants (docs/VARIANTS.md): rerope, leaky_rerope,
self_extend, streaming, lm_infinite.

A pair (query p, key j) is *near* when d = p - j < w and then scored with plain RoPE
(positions p and j); otherwise it is *far* and scored with the query at fq(p) and the key at
fk(j).  So every query block computes two score matrices and picks per pair.
"""

from __future__ import annotations

import torch

from mesa_vllm.ops.rope import RopeSpec, rotate
from mesa_vllm.plan import MesaParams
from mesa_vllm.support import PE_RULES

# rows of the score matrix per block: bounds memory at ~4M scores per (kv head, group)
_SCORES_PER_BLOCK = 1 << 22


def far_query_positions(p: torch.Tensor, params: MesaParams) -> torch.Tensor:
    """fq(p), float32 [n] for query indices p (int64 [n])."""
    w, pe = params.window, params.pe
    if PE_RULES[pe].far_keys_at_zero:
        return torch.full(p.shape, float(w), dtype=torch.float32, device=p.device)
    if pe == "leaky_rerope":
        k = params.leaky_factor
        return (p.to(torch.float64) / k + (w - w / k)).to(torch.float32)
    if pe == "self_extend":
        g = params.group_size
        return (torch.div(p, g, rounding_mode="floor") + (w - w // g)).to(torch.float32)
    if pe == "streaming":
        return p.clamp(max=params.sink_tokens + w - 1).to(torch.float32)
    raise ValueError(f"not a weave variant: {pe!r}")


def far_key_positions(j: torch.Tensor, params: MesaParams) -> torch.Tensor:
    """fk(j), float32 [n] for key indices j (int64 [n])."""
    pe = params.pe
    if PE_RULES[pe].far_keys_at_zero:
        return torch.zeros(j.shape, dtype=torch.float32, device=j.device)
    if pe == "leaky_rerope":
        return (j.to(torch.float64) / params.leaky_factor).to(torch.float32)
    if pe == "self_extend":
        return torch.div(j, params.group_size, rounding_mode="floor").to(torch.float32)
    if pe == "streaming":
        return j.to(torch.float32)
    raise ValueError(f"not a weave variant: {pe!r}")


def visible_and_near(
    p: torch.Tensor, j: torch.Tensor, params: MesaParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, near), bool [nq, nk] each, for query indices p [nq] and key indices j [nk]."""
    d = p[:, None] - j[None, :]
    visible = d >= 0
    if params.windowed:
        visible &= (j[None, :] < params.sink_tokens) | (d < params.window)
    return visible, d < params.window


def run_weave(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    seg,
    rope: RopeSpec,
    scale: float,
) -> None:
    """Attend one weave segment (a ``SegmentWork`` with ``rule`` set) and write ``output``.

    ``seg.query_pos`` [nq] / ``seg.key_pos`` [nk] hold the token indices p and j (int64),
    ``seg.key_slots`` [nk] the cache slots.  query [n, Hq, D]; caches [slots, Hkv, D].
    """
    params: MesaParams = seg.rule
    p, j = seg.query_pos, seg.key_pos
    base = j.min()
    k = key_cache[seg.key_slots]
    v = value_cache[seg.key_slots].to(torch.float32)
    k_near = rotate(k, j - base, rope)
    k_far = rotate(k, far_key_positions(j, params), rope)
    q = query[seg.q_lo : seg.q_hi]
    nq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    rows = max(1, _SCORES_PER_BLOCK // max(1, j.numel() * Hq))
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        pb = p[r0:r1]
        qb = q[r0:r1]
        q_near = rotate(qb, pb - base, rope)
        q_far = rotate(qb, far_query_positions(pb, params), rope)
        if seg.q_scale is not None:
            s = seg.q_scale[r0:r1, None, None]
            q_near, q_far = q_near * s, q_far * s
        visible, near = visible_and_near(pb, j, params)
        s_near = torch.einsum("qhgd,khd->hgqk", q_near.view(-1, Hkv, G, D), k_near)
        s_far = torch.einsum("qhgd,khd->hgqk", q_far.view(-1, Hkv, G, D), k_far)
        scores = torch.where(near, s_near, s_far) * scale
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out = torch.einsum("hgqk,khd->qhgd", probs, v).reshape(r1 - r0, Hq, D)
        output[seg.q_lo + r0 : seg.q_lo + r1] = out.to(output.dtype)
