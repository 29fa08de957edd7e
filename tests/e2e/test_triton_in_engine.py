"""The Triton kernels wired into the backend (MESA_VLLM_KERNEL=triton), run inside vLLM's
engine on the CPU under the Triton interpreter, against the dense whole-model oracle:
prefill split by the scheduler, mixed phases, and decode (split-KV kernel)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from conftest import MESA_SMALL, mesa_engine_kwargs
from oracle import dense_greedy, dense_model_logits

pytestmark = pytest.mark.e2e

SEED = int.from_bytes(os.urandom(4), "little")


@pytest.fixture(scope="module")
def triton_llm(tiny_llama):
    from vllm import LLM

    saved = {k: os.environ.get(k) for k in ("MESA_VLLM_KERNEL", "TRITON_INTERPRET")}
    os.environ.update(MESA_VLLM_KERNEL="triton", TRITON_INTERPRET="1")  # engine inherits
    kw = mesa_engine_kwargs(tiny_llama, 512, MESA_SMALL, max_num_batched_tokens=100)
    try:
        llm = LLM(**kw)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield llm
    del llm


def test_triton_kernels_match_oracle(triton_llm, tiny_llama):
    from vllm import SamplingParams

    rng = random.Random(SEED)
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n)] for n in (30, 150, 300)]
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    outs = triton_llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs, strict=True):
        got = torch.tensor(
            [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)],
            dtype=torch.float64,
        )
        lp = torch.log_softmax(dense_model_logits(tiny_llama, p, mesa=MESA_SMALL).double(), -1)
        want = lp[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        err = float((got - want).abs().max())
        assert err < 2e-3, f"T={len(p)}: max |dlogprob| {err:.2e} (seed {SEED})"
        want_tokens = dense_greedy(tiny_llama, p, 8, mesa=MESA_SMALL)
        assert list(o.outputs[0].token_ids) == want_tokens, f"T={len(p)} (seed {SEED})"
