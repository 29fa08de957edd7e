"""The dense whole-model oracle against transformers' own models (float32, eager)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds oracle.py
from oracle import dense_greedy, dense_model_logits  # noqa: E402

from mesa_vllm.testing.tiny_models import make_random_model  # noqa: E402

pytestmark = pytest.mark.unit

ARCHS = ["llama", "mistral", "qwen2", "phi3"]
MESA = dict(train_len=64, first_chunk=8, last_chunk=16, max_remainder=8, stair_width=6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_random_model(a, root / a, train_len=64) for a in ARCHS}


@pytest.fixture(scope="module")
def hf_models(models):
    from transformers import AutoModelForCausalLM

    return {
        a: AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        for a, d in models.items()
    }


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [48, 90])  # 90 > train_len: plain RoPE past L, still causal
def test_plain_logits_match_transformers(models, hf_models, arch, n):
    tok = ids(n, seed=n)
    ours = dense_model_logits(models[arch], tok, None)
    with torch.no_grad():
        ref = hf_models[arch](torch.tensor([tok])).logits[0]
    assert ours.shape == (n, 512) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_plain_greedy_matches_transformers(models, hf_models, arch):
    prompt = ids(20, seed=7)
    ours = dense_greedy(models[arch], prompt, 6, None)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(hf_models[arch](torch.tensor([seq])).logits[0, -1].argmax()))
    assert ours == seq[20:]


@pytest.mark.parametrize("arch", ARCHS)
def test_mesa_short_is_plain(models, arch):
    tok = ids(64, seed=1)  # contract item 1: no longer than L -> ordinary causal attention
    plain = dense_model_logits(models[arch], tok, None)
    torch.testing.assert_close(dense_model_logits(models[arch], tok, MESA), plain)
    grown = dense_model_logits(models[arch], tok, MESA, prompt_len=40)
    torch.testing.assert_close(grown, plain)


def test_mesa_long_prompt(models):
    # T=150: X = 150-16-8 = 126, Nq = 2, M = 14 >= 8 -> C = 42, chunks at 8, 50, 92, last
    # chunk [134, 150).  Logits of the first chunk only see the first chunk: same as plain.
    tok = ids(150, seed=2)
    plain = dense_model_logits(models["llama"], tok, None)
    mesa = dense_model_logits(models["llama"], tok, MESA)
    assert mesa.isfinite().all()
    torch.testing.assert_close(mesa[:8], plain[:8])
    assert not torch.allclose(mesa[8:], plain[8:], atol=1e-3)
    # the first token of middle chunk 1 sees the first chunk and itself at position 8,
    # exactly like token 8 of the sequence tok[:8] + [tok[50]] under plain attention
    alone = dense_model_logits(models["llama"], tok[:8] + [tok[50]], None)
    torch.testing.assert_close(mesa[50], alone[8], rtol=1e-4, atol=1e-4)


def test_mesa_greedy_keeps_prompt_len(models):
    prompt = ids(150, seed=3)
    new = dense_greedy(models["qwen2"], prompt, 3, MESA)
    assert len(new) == 3 and all(0 <= t < 512 for t in new)
    seq = prompt + new[:2]
    last = dense_model_logits(models["qwen2"], seq, MESA, prompt_len=150)[-1]
    assert int(last.argmax()) == new[2]
