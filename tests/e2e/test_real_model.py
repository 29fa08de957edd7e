"""The real model (SmolLM2-135M-Instruct, L = 8192, GQA 9/3, head_dim 64, tied embeddings)
inside vLLM on the CPU.

* Exactness: its first 4 layers (real weights and shapes), served by a real
  ``mesa-vllm serve`` process over HTTP with the default Mesa settings, against the dense
  whole-model oracle (tests/oracle.py): prompt logprobs at T <= L and at T > L, on fresh
  random token ids (seed in every failure message).  Tolerance |dlogprob| <= 2e-3, as for the
  other fp32 engine-vs-oracle checks.
* Stock equality: the whole 30-layer model, greedy tokens of chat prompts within L equal
  stock vLLM's (CPU_ATTN), Mesa and stock in the same process one after the other.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import cli_server, test_seed
from oracle import dense_model_logits

pytestmark = pytest.mark.e2e

ATOL = 2e-3
SEED = test_seed()
TRAIN_LEN = 8192
PAST_L = TRAIN_LEN + 900  # one middle chunk and a last chunk past the DynamicSplit remainder


def _random_prompt(n: int, rng: random.Random) -> list[int]:
    return [1] + [rng.randrange(100, 49000) for _ in range(n - 1)]


@pytest.fixture(scope="module")
def cut_server(smollm2_cut, tmp_path_factory):
    args = [
        "--attention-backend", "mesa", "--max-model-len", str(PAST_L + 16),
        "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.15",
        "--max-num-batched-tokens", "2048",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("real") / "server.log"
    with cli_server(smollm2_cut, args, log, served_name="smol") as srv:
        yield srv


@pytest.mark.parametrize("n_tokens", [1500, PAST_L])
def test_served_prompt_logprobs_match_dense_oracle(cut_server, smollm2_cut, n_tokens):
    from openai import OpenAI

    rng = random.Random(SEED + n_tokens)
    prompt = _random_prompt(n_tokens, rng)
    client = OpenAI(base_url=cut_server.base_url, api_key="EMPTY", timeout=900)
    r = client.completions.create(
        model="smol", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=0
    )
    got = torch.tensor(r.choices[0].logprobs.token_logprobs[1:n_tokens], dtype=torch.float64)
    mesa = {} if n_tokens <= TRAIN_LEN else {"train_len": TRAIN_LEN}
    logits = dense_model_logits(smollm2_cut, prompt, mesa=mesa).to(torch.float64)
    want = torch.log_softmax(logits, -1)[torch.arange(n_tokens - 1), torch.tensor(prompt[1:])]
    err = (got - want).abs()
    assert float(err.max()) <= ATOL, (
        f"T={n_tokens}: max |dlogprob| {float(err.max()):.2e} at index {int(err.argmax()) + 1} "
        f"(seed {SEED})"
    )


CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue. " * 40,  # ~400 tokens
]


def test_whole_model_greedy_equals_stock_within_training_length(smollm2):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mesa_vllm.testing.real_models import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    prompts = [chat_prompt_ids(tok, c) for c in CHATS]
    sp = SamplingParams(temperature=0, max_tokens=24)
    kw = dict(
        model=str(smollm2), dtype="float32", enforce_eager=True, max_model_len=4096,
        gpu_memory_utilization=0.15, seed=0,
    )  # fmt: skip
    tokens = {}
    for name, extra in (("stock", {}), ("mesa", {"attention_backend": "mesa"})):
        llm = LLM(**kw, **extra)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
        del llm
    for chat, s, m in zip(CHATS, tokens["stock"], tokens["mesa"], strict=True):
        assert m == s, f"{chat[:40]!r}: mesa {tok.decode(m)!r} vs stock {tok.decode(s)!r}"
    assert "paris" in tok.decode(tokens["mesa"][0]).lower()
