"""Random-weight HF checkpoints of each supported architecture, for structure/exactness tests.

``make_random_model("llama", out_dir, train_len=256)`` writes config.json, model.safetensors and
the project's tokenizer.  Weights come from transformers' own model classes (so vLLM loads
them exactly like a downloaded checkpoint), seeded, with a larger init std than HF's default so
attention is peaked and greedy decoding has clear winners.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesa_vllm.testing.tokenizer import copy_tokenizer, special_token_ids

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}
VOCAB = 512


def tiny_config(arch: str, train_len: int = 256, **overrides: Any):
    """A small transformers config of ``arch`` (hidden 128, 4 heads of 32, 2 KV heads)."""
    import transformers

    ids = special_token_ids()
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=train_len,
        rms_norm_eps=1e-5,
        initializer_range=0.08,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if arch == "mistral":
        kw["sliding_window"] = None
    if arch == "qwen2":
        kw["use_sliding_window"] = False
    if arch == "phi3":
        kw["original_max_position_embeddings"] = train_len
    kw.update(overrides)
    return getattr(transformers, ARCHS[arch][0])(**kw)


def make_random_model(
    arch: str, out_dir: str | Path, train_len: int = 256, seed: int = 0, **overrides: Any
) -> Path:
    """Write a seeded random checkpoint of ``arch`` to ``out_dir``; reuse it if present."""
    import torch
    import transformers

    out = Path(out_dir)
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    config = tiny_config(arch, train_len, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[arch][1])(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(out)
    return out


if __name__ == "__main__":
    import sys

    print(make_random_model(sys.argv[1], sys.argv[2]))
