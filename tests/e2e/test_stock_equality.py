"""Contract item 1: while a sequence is no longer than L, Mesa is ordinary causal RoPE
attention.  Greedy tokens and top logprobs equal the stock CPU backend's, for a random-weight
model of each supported architecture (and the rope scalings those families ship)."""

from __future__ import annotations

import random

import pytest
from conftest import cpu_engine_kwargs, test_seed

from mesa_vllm.testing.cases import LLAMA3_ROPE

pytestmark = pytest.mark.e2e

TRAIN_LEN = 128
CASES = {
    "llama": {},
    "llama3-rope": {"rope_parameters": LLAMA3_ROPE},
    "linear-rope": {
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    },
    "mistral": {},
    "qwen2": {},
    "phi3": {},
}
SEED = test_seed()


def _run(model, mesa: bool):
    from vllm import LLM, SamplingParams

    kw = cpu_engine_kwargs(TRAIN_LEN)
    if mesa:
        kw.update(attention_backend="mesa", additional_config={"mesa": {"first_chunk": 16}})
    llm = LLM(model=str(model), max_num_seqs=4, **kw)
    rng = random.Random(SEED)
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n)] for n in (5, 60, 100)]
    sp = SamplingParams(temperature=0, max_tokens=20, logprobs=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    del llm
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("case", list(CASES))
def test_short_sequences_equal_stock(case, model_root):
    from mesa_vllm.testing.tiny_models import make_random_model

    arch = case.split("-")[0] if case in ("mistral", "qwen2", "phi3") else "llama"
    model = make_random_model(
        arch, model_root / f"eq-{case}", train_len=TRAIN_LEN, seed=3, **CASES[case]
    )
    stock, mesa = _run(model, mesa=False), _run(model, mesa=True)
    for (s_tok, s_lp), (m_tok, m_lp) in zip(stock, mesa, strict=True):
        assert m_tok == s_tok, f"{case}: greedy tokens differ (seed {SEED})"
        for s_step, m_step in zip(s_lp, m_lp, strict=True):
            assert s_step.keys() == m_step.keys(), f"{case}: top-3 sets differ (seed {SEED})"
            for tok, s in s_step.items():
                assert abs(s.logprob - m_step[tok].logprob) < 1e-3, f"{case} (seed {SEED})"
