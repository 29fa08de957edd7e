"""Torch path of Mesa attention over the paged cache (CPU, and a correct fallback anywhere).

Each planned segment is one small dense problem: gather its keys from the cache, rotate
queries and keys at the plan's positions in fp32, scale stair queries by log-n, attend.
Middle chunks read only the first chunk and their own chunk, so prefill is O(T * (F + C)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mesa_vllm.ops.rope import RopeSpec, rotate
from mesa_vllm.ops.weave import run_weave


def run_segments(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    segments: Sequence,
    rope: RopeSpec,
    scale: float,
) -> None:
    """Attend every segment and write ``output``.

    query [n, Hq, D] (unrotated); key_cache / value_cache [slots, Hkv, D] (flat views of the
    paged cache, keys unrotated); output [n, Hq, D]; segments: ``SegmentWork`` items.
    """
    for seg in segments:
        if seg.rule is not None:
            run_weave(query, key_cache, value_cache, output, seg, rope, scale)
            continue
        q = rotate(query[seg.q_lo : seg.q_hi], seg.query_pos, rope)
        if seg.q_scale is not None:
            q = q * seg.q_scale[:, None, None]
        k = rotate(key_cache[seg.key_slots], seg.key_pos, rope)
        v = value_cache[seg.key_slots].to(torch.float32)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=seg.mask,
            is_causal=seg.causal,
            scale=scale,
            enable_gqa=True,
        )
        output[seg.q_lo : seg.q_hi] = out.transpose(0, 1).to(output.dtype)
