"""What Mesa supports: model architectures, RoPE types and the position rules of long queries.

The one list of each; the plugin registration, the startup checks, the configuration, the
plan, both attention paths and the benchmarks import them from here.  Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# HF architecture -> the Mesa model class vLLM loads for it (mesa_vllm.models)
ARCHITECTURES = {
    "LlamaForCausalLM": "mesa_vllm.models.mesa_models:MesaLlamaForCausalLM",
    "MistralForCausalLM": "mesa_vllm.models.mesa_models:MesaMistralForCausalLM",
    "Qwen2ForCausalLM": "mesa_vllm.models.mesa_models:MesaQwen2ForCausalLM",
    "Phi3ForCausalLM": "mesa_vllm.models.mesa_models:MesaPhi3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class PeRule:
    """A position rule of long queries (``pe``; docs/VARIANTS.md).

    code: the Triton kernels' ``PE`` constexpr.  log_n: log-n scaling on by default.
    chunked: Mesa's chunked prefill, True required / False refused / None allowed (off by
    default).  windowed: the keys are the sinks and a local window.  far_keys_at_zero: far
    keys sit at position 0, unturned.
    """

    name: str
    code: int
    log_n: bool
    chunked: bool | None
    windowed: bool = False
    far_keys_at_zero: bool = False

    @property
    def weave(self) -> bool:
        """A weave-PE variant (every rule but stair)."""
        return self.name != "stair"

    def default_window(self, train_len: int, sink_tokens: int) -> int:
        """w (rerope, leaky_rerope, self_extend) or W (streaming, lm_infinite) by default."""
        if self.name == "streaming":
            return train_len - sink_tokens
        if self.name == "lm_infinite":
            return train_len - 1
        return max(1, min(512, train_len // 2))


PE_RULES = {
    r.name: r
    for r in (
        PeRule("stair", 0, log_n=True, chunked=True),
        PeRule("rerope", 1, log_n=True, chunked=None, far_keys_at_zero=True),
        PeRule("leaky_rerope", 2, log_n=True, chunked=None),
        PeRule("self_extend", 3, log_n=False, chunked=None),
        PeRule("streaming", 4, log_n=False, chunked=False, windowed=True),
        PeRule("lm_infinite", 5, log_n=False, chunked=False, windowed=True, far_keys_at_zero=True),
    )
}
PE_NAMES = tuple(PE_RULES)
WINDOWED_PE = tuple(n for n, r in PE_RULES.items() if r.windowed)


def default_leaky_factor(max_len: int, train_len: int, window: int) -> float:
    """k of leaky_rerope by default: the smallest that keeps every far position of a sequence
    of ``max_len`` tokens in the trained range."""
    return max(1.0, (max_len - 1 - window) / max(1, train_len - 1 - window))


def smallest_group_size(max_len: int, train_len: int, window: int) -> int:
    """Smallest G >= 1 with floor((max_len - 1) / G) + w - floor(w / G) <= L - 1, i.e. every
    Self-Extend far position of a sequence of ``max_len`` tokens stays in the trained range."""
    if window > train_len - 1:
        raise ValueError(f"window={window} must be <= train_len - 1 = {train_len - 1}")
    g = max(1, math.ceil((max_len - 1 - window) / max(1, train_len - 1 - window)) - 2)
    while (max_len - 1) // g + window - window // g > train_len - 1:  # ends by g = max_len
        g += 1
    return g
