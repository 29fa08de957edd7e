"""Dense whole-model oracle: a plain-torch float32 forward of a HF checkpoint directory.

Reads config.json and model.safetensors directly (no transformers model classes) for
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases) and Phi3ForCausalLM
(fused qkv_proj and gate_up_proj).  Attention is ``mesa_attention_reference`` when a ``mesa``
dict is given, else plain causal RoPE.  End-to-end tests compare vLLM's output against it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from mesa_vllm.testing.reference import causal_attention_reference, mesa_attention_reference
from mesa_vllm.testing.reference_variants import VariantSpec, variant_attention_reference

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")
MESA_DEFAULTS = {
    "first_chunk": 100,
    "last_chunk": 512,
    "max_remainder": 200,
    "stair_width": 50,
    "log_n_scaling": True,
    "split": "dynamic",
    "middle_chunk": None,
    "near_window": 0,
    "long_query_scale": 1.0,
}


@functools.lru_cache(maxsize=8)
def _load(model_dir: str, mtime: float) -> tuple[dict, dict[str, torch.Tensor]]:
    del mtime  # part of the cache key only: a rewritten checkpoint is reloaded
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    arch = cfg["architectures"][0]
    if arch not in ARCHS:
        raise NotImplementedError(f"{arch}: oracle supports {ARCHS}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r}")
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    return cfg, {name: w.to(torch.float32) for name, w in weights.items()}


def load_checkpoint(model_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, float32 weights by name) of a checkpoint directory; cached."""
    path = Path(model_dir).resolve()
    return _load(str(path), (path / "model.safetensors").stat().st_mtime)


def rope_parameters(cfg: dict) -> dict:
    """RoPE parameters from a config: transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` pair, plus ``partial_rotary_factor``."""
    rp = dict(cfg.get("rope_parameters") or {})
    if not rp:
        rp = dict(cfg.get("rope_scaling") or {})
        rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if "type" in rp and "rope_type" not in rp:
        rp["rope_type"] = rp.pop("type")
    rp.setdefault("rope_type", "default")
    rp.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return rp


def train_len(cfg: dict) -> int:
    """The model's trained context L: original_max_position_embeddings if set, else
    max_position_embeddings."""
    return int(cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])


def variant_spec(m: dict) -> VariantSpec:
    """The reference's VariantSpec of a mesa dict with an explicit ``pe`` variant: every
    variant field must be given (the oracle resolves no defaults: it checks the engine's)."""
    return VariantSpec(
        pe=m["pe"],
        chunked_prefill=m["chunked_prefill"],
        window=m["window"],
        leaky_factor=float(m.get("leaky_factor", 1.0)),
        group_size=m.get("group_size", 1),
        sink_tokens=m.get("sink_tokens", 0),
        log_n=m["log_n_scaling"],
        F=m["first_chunk"],
        Lc=m["last_chunk"],
        Mmax=m["max_remainder"],
        E=m["stair_width"],
    )


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x: float32 [S, H]; w: float32 [H]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _linear(x: torch.Tensor, W: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x: float32 [S, in] -> [S, out] with weight ``name.weight`` and optional ``name.bias``."""
    y = x @ W[f"{name}.weight"].T
    bias = W.get(f"{name}.bias")
    return y if bias is None else y + bias


def dense_model_logits(
    model_dir: str | os.PathLike,
    token_ids: list[int],
    mesa: dict | None = None,
    prompt_len: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits, float32 [S, vocab], of every position of ``token_ids`` (S tokens).

    ``mesa``: None for plain causal RoPE attention; else a dict with keys train_len,
    first_chunk, last_chunk, max_remainder, stair_width (an int or "auto"), log_n_scaling,
    split ("dynamic" or "fixed"), middle_chunk (the fixed split's middle-chunk width, None:
    L - F), near_window (the fewest own-position tokens of a stair query set, 0: the paper's),
    long_query_scale (the factor on stair queries, 1: the paper's)
    (missing keys take the paper's defaults, docs/CONFIGURATION.md; train_len defaults to
    the config's trained length), and for a weave variant (docs/VARIANTS.md) pe,
    chunked_prefill, window and the variant's own keys.
    ``prompt_len``: how many of ``token_ids`` are the prompt (default all); the rest are
    treated as generated tokens by the Mesa rules.  ``kv_dtype``: the dtype of a quantized
    KV cache (fp8): every layer's keys (unrotated) and values are rounded to it, as the
    cache stores them at vLLM's default scale of 1.
    """
    cfg, W = load_checkpoint(model_dir)
    S = len(token_ids)
    T = S if prompt_len is None else prompt_len
    arch = cfg["architectures"][0]
    Hq = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or Hq
    D = cfg.get("head_dim") or cfg["hidden_size"] // Hq
    eps = cfg["rms_norm_eps"]
    rp = rope_parameters(cfg)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window is not None and S > window:
        raise NotImplementedError(f"sliding_window {window} < sequence length {S}")
    m = None
    if mesa is not None:
        m = {**MESA_DEFAULTS, "train_len": train_len(cfg), **mesa}

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if m is None:
            return causal_attention_reference(q, k, v, rope_parameters=rp)
        if m.get("pe", "stair") != "stair":
            return variant_attention_reference(
                q, k, v, T_prompt=T, L=m["train_len"], spec=variant_spec(m), rope_parameters=rp
            )
        return mesa_attention_reference(
            q, k, v, T_prompt=T, L=m["train_len"], F=m["first_chunk"], Lc=m["last_chunk"],
            Mmax=m["max_remainder"], E=m["stair_width"], log_n=m["log_n_scaling"],
            rope_parameters=rp, split=m["split"], width=m["middle_chunk"],
            near_window=m["near_window"], long_scale=m["long_query_scale"],
        )  # fmt: skip

    x = W["model.embed_tokens.weight"][torch.tensor(token_ids, dtype=torch.long)]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        h = _rms_norm(x, W[f"{pre}.input_layernorm.weight"], eps)
        if arch == "Phi3ForCausalLM":
            qkv = _linear(h, W, f"{pre}.self_attn.qkv_proj")
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q = _linear(h, W, f"{pre}.self_attn.q_proj")
            k = _linear(h, W, f"{pre}.self_attn.k_proj")
            v = _linear(h, W, f"{pre}.self_attn.v_proj")
        if kv_dtype is not None:
            k, v = (t.to(kv_dtype).to(t.dtype) for t in (k, v))
        a = attention(q.reshape(S, Hq, D), k.reshape(S, Hkv, D), v.reshape(S, Hkv, D))
        x = x + _linear(a.reshape(S, Hq * D), W, f"{pre}.self_attn.o_proj")
        h = _rms_norm(x, W[f"{pre}.post_attention_layernorm.weight"], eps)
        if arch == "Phi3ForCausalLM":
            gate, up = _linear(h, W, f"{pre}.mlp.gate_up_proj").chunk(2, dim=-1)
        else:
            gate = _linear(h, W, f"{pre}.mlp.gate_proj")
            up = _linear(h, W, f"{pre}.mlp.up_proj")
        x = x + _linear(torch.nn.functional.silu(gate) * up, W, f"{pre}.mlp.down_proj")
    x = _rms_norm(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def dense_greedy(
    model_dir: str | os.PathLike,
    prompt_ids: list[int],
    n_new: int,
    mesa: dict | None = None,
    eos_token_id: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> list[int]:
    """Greedy continuation (the new tokens only) of ``prompt_ids``, one full forward per token.

    Generated tokens stay generated: the Mesa prompt length is ``len(prompt_ids)`` at every
    step.  Stops after ``n_new`` tokens, or after emitting ``eos_token_id`` when given.
    """
    seq = list(prompt_ids)
    out: list[int] = []
    for _ in range(n_new):
        logits = dense_model_logits(model_dir, seq, mesa, len(prompt_ids), kv_dtype)
        tok = int(torch.argmax(logits[-1]))
        seq.append(tok)
        out.append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            break
    return out


def prompt_logprob_error(
    model_dir, prompt: list[int], prompt_logprobs, mesa: dict | None, kv_dtype=None
) -> float:
    """max |engine - oracle| over the logprobs of prompt tokens 1..S-1.  ``prompt_logprobs``
    is vLLM's ``RequestOutput.prompt_logprobs`` (first entry None); kv_dtype as
    ``dense_model_logits``."""
    got = torch.tensor(
        [d[t].logprob for d, t in zip(prompt_logprobs[1:], prompt[1:], strict=True)],
        dtype=torch.float64,
    )
    logits = dense_model_logits(model_dir, prompt, mesa=mesa, kv_dtype=kv_dtype).double()
    want = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    return (got - want).abs().max().item()
