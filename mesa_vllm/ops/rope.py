"""RoPE applied by the Mesa backend at positions the plan chooses (keys are cached unrotated).

The frequencies are taken from the model's own vLLM rotary module, so short sequences rotate
exactly like the stock path; angles are computed in fp32 from rebased positions, never by
indexing vLLM's cos/sin cache (which ends at max_position_embeddings, vllm#17924).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mesa_vllm.support import ROPE_TYPES


@dataclass
class RopeSpec:
    """What the backend needs to rotate: inv_freq [rotary_dim // 2] fp32, the rotated width
    (a prefix of head_size; partial rotary for Phi-style models) and the pairing style."""

    inv_freq: torch.Tensor
    rotary_dim: int
    head_size: int
    is_neox_style: bool = True


def rope_spec_from_vllm(rotary_emb: torch.nn.Module) -> RopeSpec:
    """Build a RopeSpec from a vLLM rotary module (RotaryEmbedding, LinearScaling, Llama3)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import (
        LinearScalingRotaryEmbedding,
    )
    from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding

    kind = type(rotary_emb)
    if kind not in (RotaryEmbedding, LinearScalingRotaryEmbedding, Llama3RotaryEmbedding):
        raise ValueError(
            f"Mesa backend: unsupported rotary embedding {kind.__name__}; supported rope types: "
            f"{', '.join(ROPE_TYPES)}"
        )
    inv_freq = rotary_emb._compute_inv_freq(rotary_emb.base).to(torch.float32).cpu()
    if kind is LinearScalingRotaryEmbedding:
        factors = rotary_emb.scaling_factors
        if len(factors) != 1:
            raise ValueError("Mesa backend: one linear rope scaling factor is supported")
        inv_freq = inv_freq / float(factors[0])
    return RopeSpec(inv_freq, rotary_emb.rotary_dim, rotary_emb.head_size, rotary_emb.is_neox_style)


def rotate(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Rotate ``x`` [n, H, head_size] (any float dtype) at ``positions`` [n] (int64).

    Returns fp32 [n, H, head_size]; dims past ``rotary_dim`` pass through unchanged.
    """
    x = x.to(torch.float32)
    inv = spec.inv_freq.to(x.device)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # [n, rd/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    rd = spec.rotary_dim
    rot, rest = x[..., :rd], x[..., rd:]
    if spec.is_neox_style:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
