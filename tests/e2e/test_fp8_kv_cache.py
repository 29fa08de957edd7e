"""An fp8 KV cache (``--kv-cache-dtype fp8``) with the Mesa Triton kernels, inside vLLM's
engine on the CPU under the Triton interpreter (the CPU's torch path refuses fp8:
tests/unit/test_engine_config.py).  The engine's cache write rounds the unrotated keys and
the values to fp8 e4m3 (vLLM's default scale 1); the kernels read them back.  Oracle: the
dense whole-model reference with every layer's keys and values rounded the same way."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import MESA_SMALL, interpreter_llm, mesa_engine_kwargs, test_seed
from oracle import dense_greedy, prompt_logprob_error

pytestmark = pytest.mark.e2e

SEED = test_seed()
FP8 = torch.float8_e4m3fn
# The engine's float32 projections and the oracle's round differently only where a key or
# value lies within float32 noise of an fp8 rounding midpoint; one such element then rounds
# one fp8 step apart.  Measured on this model: the oracle against itself with float64
# projections differs by up to 2.8e-3 (seed 3395253430, T=151), usually by < 1e-4; the
# unquantized oracle is 0.07-0.25 away from the fp8 one.  The tolerance admits a few flips.
FP8_TOL = 1e-2


@pytest.fixture(scope="module")
def fp8_llm(tiny_llama):
    llm = interpreter_llm(**mesa_engine_kwargs(tiny_llama, 512, MESA_SMALL,
                                               max_num_batched_tokens=100,
                                               kv_cache_dtype="fp8"))  # fmt: skip
    yield llm
    del llm


def test_fp8_cache_equals_the_oracle_with_fp8_keys_and_values(fp8_llm, tiny_llama):
    """Prompts within L and past it (prefill split by the scheduler, decode): prompt logprobs
    within FP8_TOL of the fp8 oracle and the same greedy tokens; the unquantized oracle is
    at least 3x farther away, so the check sees the rounding."""
    from vllm import SamplingParams

    rng = random.Random(SEED)
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n)] for n in (30, 150, 300)]
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    outs = fp8_llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs, strict=True):
        errs = {name: prompt_logprob_error(tiny_llama, p, o.prompt_logprobs, MESA_SMALL, kv)
                for name, kv in (("fp8", FP8), ("unquantized", None))}  # fmt: skip
        assert errs["fp8"] < FP8_TOL, f"T={len(p)}: {errs} (seed {SEED})"
        assert errs["unquantized"] > 3 * FP8_TOL, f"T={len(p)}: {errs} (seed {SEED})"
        want_tokens = dense_greedy(tiny_llama, p, 8, mesa=MESA_SMALL, kv_dtype=FP8)
        assert list(o.outputs[0].token_ids) == want_tokens, f"T={len(p)} (seed {SEED})"
