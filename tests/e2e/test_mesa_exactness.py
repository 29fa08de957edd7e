"""The Mesa contract inside vLLM's engine (CPU path) against the dense whole-model oracle.

The oracle (tests/oracle.py) runs the checkpoint in plain torch with the independent dense
reference attention (mesa_vllm/testing/reference.py) in every layer.  Prompts are fresh random
token ids (the seed is in every failure message).  Tolerance: |logprob difference| <= 2e-3
(fp32 engine vs fp32 oracle; the two sum in different orders).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import MESA_SMALL, TRAIN_LEN, mesa_engine_kwargs, test_seed
from oracle import dense_greedy, dense_model_logits

pytestmark = pytest.mark.e2e

ATOL = 2e-3
MAX_LEN = 1100
SEED = test_seed()


def _prompt(n: int, rng: random.Random) -> list[int]:
    return [0] + [rng.randrange(3, 450) for _ in range(n - 1)]


def _engine(model, **overrides):
    from vllm import LLM

    return LLM(**mesa_engine_kwargs(model, MAX_LEN, MESA_SMALL, **{"max_num_seqs": 8, **overrides}))


@pytest.fixture(scope="module")
def mesa_llm(tiny_llama):
    llm = _engine(tiny_llama, max_num_batched_tokens=2048)
    yield llm
    del llm


@pytest.fixture(scope="module")
def chunked_llm(tiny_llama):
    """Prefill split every 100 tokens (not a multiple of the chunk width 56) and a KV cache of
    80 blocks x 16 tokens, small enough that three long requests force preemption."""
    llm = _engine(
        tiny_llama, max_num_batched_tokens=100, num_gpu_blocks_override=80, disable_log_stats=False
    )
    yield llm
    del llm


def _prompt_logprobs(llm, prompts: list[list[int]], max_tokens: int = 1):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    result = []
    for p, o in zip(prompts, outs, strict=True):
        lps = [d[tok].logprob for d, tok in zip(o.prompt_logprobs[1:], p[1:], strict=True)]
        result.append((torch.tensor(lps, dtype=torch.float64), list(o.outputs[0].token_ids)))
    return result


def _oracle_logprobs(model, prompt: list[int], mesa: dict = MESA_SMALL) -> torch.Tensor:
    logits = dense_model_logits(model, prompt, mesa=mesa).to(torch.float64)
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs()
    worst = int(err.argmax())
    assert float(err.max()) <= ATOL, (
        f"{what}: max |dlogprob| {float(err.max()):.2e} at prompt index {worst + 1} (seed {SEED})"
    )


def test_layers_use_mesa_backend(mesa_llm):
    from mesa_vllm.testing.inspect import attention_impl_names

    assert mesa_llm.apply_model(attention_impl_names) == [["MesaAttentionImpl"]]


@pytest.mark.parametrize("multiple", [0.6, 1.1, 4, 16])
def test_prompt_logprobs_match_dense_oracle(mesa_llm, tiny_llama, multiple):
    rng = random.Random(SEED + int(multiple * 10))
    prompt = _prompt(int(multiple * TRAIN_LEN), rng)
    ((got, _),) = _prompt_logprobs(mesa_llm, [prompt])
    _assert_close(got, _oracle_logprobs(tiny_llama, prompt), f"T={len(prompt)}")


def test_mixed_batch_matches_oracle(mesa_llm, tiny_llama):
    """Requests in every phase in the same steps: short, just over L, long."""
    rng = random.Random(SEED + 1)
    prompts = [_prompt(n, rng) for n in (20, 64, 65, 150, 333, 700)]
    for prompt, (got, _) in zip(prompts, _prompt_logprobs(mesa_llm, prompts), strict=True):
        _assert_close(got, _oracle_logprobs(tiny_llama, prompt), f"batched T={len(prompt)}")


@pytest.mark.parametrize("n_prompt", [40, 300])
def test_greedy_continuation_matches_oracle(mesa_llm, tiny_llama, n_prompt):
    """32 generated tokens: decode crosses L (n_prompt=40) or runs on stair anchors (300)."""
    from vllm import SamplingParams

    rng = random.Random(SEED + n_prompt)
    prompt = _prompt(n_prompt, rng)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = mesa_llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    want = dense_greedy(tiny_llama, prompt, 32, mesa=MESA_SMALL)
    assert list(out.outputs[0].token_ids) == want, f"seed {SEED}"


def test_chunked_prefill_and_preemption_match_oracle(chunked_llm, tiny_llama):
    rng = random.Random(SEED + 7)
    prompts = [_prompt(n, rng) for n in (600, 610, 590)]
    results = _prompt_logprobs(chunked_llm, prompts, max_tokens=40)
    for prompt, (got, _) in zip(prompts, results, strict=True):
        _assert_close(got, _oracle_logprobs(tiny_llama, prompt), f"chunked T={len(prompt)}")
    preemptions = sum(
        getattr(m, "value", 0)
        for m in chunked_llm.get_metrics()
        if m.name == "vllm:num_preemptions"
    )
    assert preemptions > 0, "KV cache was not small enough to force a preemption"
    # generated tokens after preemption/recompute equal the dense greedy continuation
    want = dense_greedy(tiny_llama, prompts[0], 40, mesa=MESA_SMALL)
    assert results[0][1] == want, f"seed {SEED}"


# ------------------------------------------------------------------ stair_width: auto

MESA_AUTO = {**MESA_SMALL, "stair_width": "auto"}


@pytest.fixture(scope="module")
def auto_llm(tiny_llama):
    """stair_width "auto": each stair query set takes the smallest E that keeps it inside L;
    prefill split every 100 tokens, so last chunks are resumed mid-way."""
    from vllm import LLM

    llm = LLM(
        **mesa_engine_kwargs(
            tiny_llama, MAX_LEN, MESA_AUTO, max_num_seqs=8, max_num_batched_tokens=100
        )
    )
    yield llm
    del llm


@pytest.mark.parametrize("multiple", [4, 16])
def test_auto_prompt_logprobs_match_dense_oracle(auto_llm, tiny_llama, multiple):
    """The oracle's reference finds E by its own search over E (not plan.stair_width_for)."""
    rng = random.Random(SEED + 100 + multiple)
    prompt = _prompt(int(multiple * TRAIN_LEN), rng)
    ((got, _),) = _prompt_logprobs(auto_llm, [prompt])
    _assert_close(got, _oracle_logprobs(tiny_llama, prompt, MESA_AUTO), f"auto T={len(prompt)}")


def test_auto_greedy_continuation_crosses_an_anchor(auto_llm, tiny_llama):
    """T = 300 (C = 53): 32 generated tokens cross the anchor at n = 319, and E(n) changes
    with n inside each anchor."""
    from vllm import SamplingParams

    from mesa_vllm.plan import MesaParams, dynamic_split, stair_anchor, stair_width_for

    params = MesaParams(64, 8, 24, 10, None)
    C = dynamic_split(300, params).width
    assert len({stair_anchor(n, C) for n in range(301, 333)}) > 1
    assert len({stair_width_for(n, C, params) for n in range(301, 333)}) > 2
    rng = random.Random(SEED + 300)
    prompt = _prompt(300, rng)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = auto_llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    want = dense_greedy(tiny_llama, prompt, 32, mesa=MESA_AUTO)
    assert list(out.outputs[0].token_ids) == want, f"seed {SEED}"


# ------------------------------------------------------------------ long_query_scale

MESA_HOT = {**MESA_SMALL, "long_query_scale": 1.6}


@pytest.fixture(scope="module")
def hot_llm(tiny_llama):
    """long_query_scale 1.6 (a sharper softmax for every stair query); prefill split every 100
    tokens, so a last chunk is cut across steps."""
    from vllm import LLM

    llm = LLM(
        **mesa_engine_kwargs(
            tiny_llama, MAX_LEN, MESA_HOT, max_num_seqs=8, max_num_batched_tokens=100
        )
    )
    yield llm
    del llm


def test_long_query_scale_prompts_and_decode_match_dense_oracle(hot_llm, tiny_llama):
    """Prompt logprobs at T = 3 L + 7 and 5 L equal the oracle's with the same scale, which
    differ from the paper's (scale 1); 16 greedy tokens from T = 3 L + 7 equal the oracle's."""
    from vllm import SamplingParams

    rng = random.Random(SEED + 500)
    prompts = [_prompt(3 * TRAIN_LEN + 7, rng), _prompt(5 * TRAIN_LEN, rng)]
    for prompt, (got, _) in zip(prompts, _prompt_logprobs(hot_llm, prompts), strict=True):
        want = _oracle_logprobs(tiny_llama, prompt, MESA_HOT)
        _assert_close(got, want, f"long_query_scale T={len(prompt)}")
        paper = _oracle_logprobs(tiny_llama, prompt, MESA_SMALL)
        assert float((paper - want).abs().max()) > 10 * ATOL, f"T={len(prompt)} (seed {SEED})"
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    out = hot_llm.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)[0]
    want = dense_greedy(tiny_llama, prompts[0], 16, mesa=MESA_HOT)
    assert list(out.outputs[0].token_ids) == want, f"seed {SEED}"


# ------------------------------------------------------------------ near_window

# The fixed split's narrow grid (C = 16) makes the paper's near window n - A cycle through
# 0 .. 15; near_window = 12 keeps at least 12 tokens at their own positions.
MESA_NEAR = {**MESA_SMALL, "split": "fixed", "middle_chunk": 16, "near_window": 12}


@pytest.fixture(scope="module")
def near_llm(tiny_llama):
    """near_window with stair_width "auto" (E per anchor, which now moves with the first 12
    generated tokens after each jump); prefill split every 100 tokens."""
    from vllm import LLM

    mesa = {**MESA_NEAR, "stair_width": "auto"}
    llm = LLM(
        **mesa_engine_kwargs(tiny_llama, MAX_LEN, mesa, max_num_seqs=8, max_num_batched_tokens=100)
    )
    yield llm
    del llm


def test_near_window_prompts_and_decode_match_dense_oracle(near_llm, tiny_llama):
    """T = 305 (the paper's anchor leaves no token at its own position: 304 = 19 C) and
    T = 300 (11 tokens): prompt logprobs equal the oracle's, which differ from the paper's
    anchor; 24 greedy tokens from T = 300 cross two anchors (n - 1 = 304, 320)."""
    from vllm import SamplingParams

    mesa = {**MESA_NEAR, "stair_width": "auto"}
    rng = random.Random(SEED + 400)
    prompts = [_prompt(305, rng), _prompt(300, rng)]
    for prompt, (got, _) in zip(prompts, _prompt_logprobs(near_llm, prompts), strict=True):
        want = _oracle_logprobs(tiny_llama, prompt, mesa)
        _assert_close(got, want, f"near_window T={len(prompt)}")
        paper = _oracle_logprobs(tiny_llama, prompt, {**mesa, "near_window": 0})
        assert float((paper - want).abs().max()) > 10 * ATOL, f"T={len(prompt)} (seed {SEED})"
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = near_llm.generate([{"prompt_token_ids": prompts[1]}], sp, use_tqdm=False)[0]
    want = dense_greedy(tiny_llama, prompts[1], 24, mesa=mesa)
    assert list(out.outputs[0].token_ids) == want, f"seed {SEED}"
