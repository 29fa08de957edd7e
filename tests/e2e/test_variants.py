"""The weave-PE variants (docs/VARIANTS.md) inside vLLM's engine (CPU path) against the dense
whole-model oracle, which runs the independent reference (mesa_vllm/testing/reference_variants.py)
in every layer.  Same tolerance as the Stair PE exactness tests: |logprob difference| <= 2e-3
(fp32 engine vs fp32 oracle), greedy continuations equal.  Prompts are fresh random ids.
"""

from __future__ import annotations

import random

import pytest
from conftest import MESA_SMALL, TRAIN_LEN, mesa_engine_kwargs, test_seed
from oracle import dense_greedy, dense_model_logits, prompt_logprob_error

from mesa_vllm.testing.cases import VARIANT_CASES

pytestmark = pytest.mark.e2e

ATOL = 2e-3
MAX_LEN = 900
SEED = test_seed()

VARIANTS = VARIANT_CASES


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tiny_llama):
    from vllm import LLM

    mesa = {**MESA_SMALL, **VARIANTS[request.param]}
    # prefill split in 160-token steps
    kw = mesa_engine_kwargs(tiny_llama, MAX_LEN, mesa, max_num_seqs=4, max_num_batched_tokens=160)
    llm = LLM(**kw)
    yield request.param, mesa, llm
    del llm


def test_variant_matches_oracle(variant, tiny_llama):
    from vllm import SamplingParams

    name, mesa, llm = variant
    rng = random.Random(SEED)
    lengths = (40, 5 * TRAIN_LEN + 3, 13 * TRAIN_LEN + 11)  # short, 5x, 13x the training length
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n - 1)] for n in lengths]
    sp = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs, strict=True):
        err = prompt_logprob_error(tiny_llama, p, o.prompt_logprobs, mesa)
        assert err <= ATOL, f"{name} T={len(p)} seed={SEED}: max |dlogprob| {err:.2e}"
    # decode (long generated tokens) through the same rule: greedy equals the oracle's
    p, o = prompts[1], outs[1]
    want = dense_greedy(tiny_llama, p, 6, mesa=mesa)
    assert list(o.outputs[0].token_ids) == want, f"{name} seed={SEED}"


def test_variants_differ_from_stair(tiny_llama):
    """The variant really changes the long-prompt attention (the oracle sees a different model
    for every pe), so the equalities above cannot pass by ignoring ``pe``."""
    rng = random.Random(SEED)
    p = [0] + [rng.randrange(3, 450) for _ in range(4 * TRAIN_LEN)]
    stair = dense_model_logits(tiny_llama, p, mesa=MESA_SMALL)
    for name, v in VARIANTS.items():
        other = dense_model_logits(tiny_llama, p, mesa={**MESA_SMALL, **v})
        assert (other - stair).abs().max() > 1e-2, name
