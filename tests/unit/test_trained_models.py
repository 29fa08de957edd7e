"""The committed passkey models: they load with transformers and find the key within L.

Each model under ``mesa_vllm/assets/models/passkey-*`` was trained by
``training/train_passkey.py`` at a short training length L (its MODEL_CARD.md says which and
how it was measured).  Here, on CPU: 20 fresh seeded passkey prompts no longer than L, greedy
decoding, the official score (first integer equals the key); at least 19 must be right.  And
``max_position_embeddings`` must be the documented training length.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from mesa_vllm.eval.data import passkey_sample, score

pytestmark = pytest.mark.unit

MODELS_DIR = Path(__file__).resolve().parents[2] / "mesa_vllm" / "assets" / "models"
MODELS = ["passkey-llama", "passkey-qwen2"]
ARCH = {"passkey-llama": "LlamaForCausalLM", "passkey-qwen2": "Qwen2ForCausalLM"}
ANSWER_TOKENS = 8  # " ", 5 digits, ".", EOS


def _card_train_len(model_dir: Path) -> int:
    card = (model_dir / "MODEL_CARD.md").read_text()
    m = re.search(r"Training length:\*{0,2}\s*(\d+)\s*tokens", card)
    assert m, "MODEL_CARD.md must state 'Training length: N tokens'"
    return int(m.group(1))


@pytest.mark.parametrize("name", MODELS)
def test_files_and_training_length(name):
    d = MODELS_DIR / name
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "MODEL_CARD.md",
    ):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [ARCH[name]]
    assert cfg["max_position_embeddings"] == _card_train_len(d)
    assert cfg["vocab_size"] == 512
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert head_dim in (32, 64)
    assert (d / "model.safetensors").stat().st_size <= 8 * 1024 * 1024


@pytest.mark.parametrize("name", MODELS)
def test_finds_passkey_within_training_length(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = MODELS_DIR / name
    train_len = _card_train_len(d)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    rng = random.Random(20240 + len(name))
    shortest = len(tok.encode(passkey_sample(tok, 0, rng=random.Random(0)).prompt))
    samples = [
        passkey_sample(tok, rng.randint(shortest, train_len - ANSWER_TOKENS), rng=rng)
        for _ in range(20)
    ]
    # One batched greedy generate; left padding, so positions come from the attention mask
    # and every prompt starts at position 0 (BOS), as it would alone.
    tok.padding_side = "left"
    enc = tok([s.prompt for s in samples], return_tensors="pt", padding=True)
    lens = enc.attention_mask.sum(1)
    assert bool(
        (
            enc.input_ids[enc.attention_mask.bool()].view(-1)[lens.cumsum(0) - lens]
            == tok.bos_token_id
        ).all()
    )
    assert int(lens.max()) + ANSWER_TOKENS - 1 <= train_len
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=ANSWER_TOKENS - 1, do_sample=False, pad_token_id=tok.pad_token_id
        )
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    right = sum(score(t, s.answer) for t, s in zip(texts, samples, strict=True))
    wrong = [
        (int(n), s.answer, t)
        for n, s, t in zip(lens, samples, texts, strict=True)
        if not score(t, s.answer)
    ]
    assert right >= 19, f"{name}: {right}/20 right; wrong: {wrong}"
