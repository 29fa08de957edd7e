"""vLLM's Llama / Mistral / Qwen2 / Phi-3, with attention handed to the Mesa backend.

Each class is registered over vLLM's architecture name and is the stock class unless the
Mesa backend is selected.  Then every decoder attention module gets

* ``rotary_emb`` replaced by ``DeferredRope`` (q and k pass through unrotated: keys are cached
  unrotated and the backend rotates them at the plan's positions), and
* ``attn`` rebuilt as a vLLM ``Attention`` with ``attn_backend=MesaAttentionBackend`` and the
  module's RoPE frequencies, so the choice holds on every platform (the CPU platform ignores
  ``--attention-backend``).  The stock layer's registration is removed first, so exactly one
  layer is registered under each name.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from mesa_vllm.engine_config import mesa_enabled
from mesa_vllm.ops.rope import rope_spec_from_vllm

logger = logging.getLogger("vllm.mesa_vllm")


class DeferredRope(nn.Module):
    """Stands where the model's rotary embedding was: returns q and k unchanged."""

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return query, key


def _mesa_attention_like(stock: Attention, spec) -> Attention:
    from mesa_vllm.attention.backend import MesaAttentionBackend

    vllm_config = get_current_vllm_config()
    vllm_config.compilation_config.static_forward_context.pop(stock.layer_name, None)
    return Attention(
        stock.num_heads,
        stock.head_size,
        stock.impl.scale,
        num_kv_heads=stock.num_kv_heads,
        cache_config=vllm_config.cache_config,
        quant_config=stock.quant_config,
        prefix=stock.layer_name,
        attn_type=stock.attn_type,
        attn_backend=MesaAttentionBackend,
        mesa_rope=spec,
    )


def convert_to_mesa(model: nn.Module) -> int:
    """Hand every decoder attention of ``model`` to the Mesa backend; returns how many."""
    converted = 0
    for module in model.modules():
        attn = getattr(module, "attn", None)
        rotary = getattr(module, "rotary_emb", None)
        if isinstance(attn, Attention) and rotary is not None:
            spec = rope_spec_from_vllm(rotary)
            if spec.head_size != attn.head_size:
                raise ValueError("Mesa backend: rotary head size differs from attention's")
            module.rotary_emb = DeferredRope()
            module.attn = _mesa_attention_like(attn, spec)
            converted += 1
    if converted == 0:
        raise ValueError("Mesa backend: found no attention layer with a rotary embedding")
    logger.info("Mesa: %d attention layers use MesaAttentionBackend (RoPE deferred)", converted)
    return converted


def _with_mesa(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (a vLLM model class), converted to Mesa when the Mesa backend is selected."""

    class MesaModel(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            if mesa_enabled(vllm_config):
                convert_to_mesa(self)

    MesaModel.__name__ = MesaModel.__qualname__ = f"Mesa{base.__name__}"
    return MesaModel


MesaLlamaForCausalLM = _with_mesa(LlamaForCausalLM)
MesaMistralForCausalLM = _with_mesa(MistralForCausalLM)
MesaQwen2ForCausalLM = _with_mesa(Qwen2ForCausalLM)
MesaPhi3ForCausalLM = _with_mesa(Phi3ForCausalLM)
