"""The Triton kernels wired into the backend (MESA_VLLM_KERNEL=triton), run inside vLLM's
engine on the CPU under the Triton interpreter, against the dense whole-model oracle:
prefill split by the scheduler, mixed phases, and decode (split-KV kernel)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import MESA_SMALL, interpreter_llm, mesa_engine_kwargs, test_seed
from oracle import dense_greedy, dense_model_logits

pytestmark = pytest.mark.e2e

SEED = test_seed()


@pytest.fixture(scope="module")
def triton_llm(tiny_llama):
    llm = interpreter_llm(**mesa_engine_kwargs(tiny_llama, 512, MESA_SMALL,
                                               max_num_batched_tokens=100))  # fmt: skip
    yield llm
    del llm


@pytest.fixture(scope="module")
def middle_llm(tiny_llama):
    """The same engine with MESA_VLLM_MIDDLE_FA=torch: middle chunks as one varlen causal
    call over keys gathered from the cache (torch's rotation and attention standing in for
    vLLM's rotary kernel and FlashAttention), the rest on the Triton kernels."""
    llm = interpreter_llm(env={"MESA_VLLM_MIDDLE_FA": "torch"},
                          **mesa_engine_kwargs(tiny_llama, 512, MESA_SMALL,
                                               max_num_batched_tokens=100))  # fmt: skip
    yield llm
    del llm


def test_middle_chunks_as_one_varlen_call_match_oracle(middle_llm, tiny_llama):
    _check_against_oracle(middle_llm, tiny_llama)
    # the switch reached the engine: its metadata builder sends the middle chunks that way
    modes = middle_llm.collective_rpc(_builder_middle_mode)
    assert modes and all(m == "torch" for m in modes), modes


def _builder_middle_mode(worker) -> str | None:
    return worker.model_runner.attn_groups[0][0].get_metadata_builder().middle_mode


def test_triton_kernels_match_oracle(triton_llm, tiny_llama):
    _check_against_oracle(triton_llm, tiny_llama)


def _check_against_oracle(llm, tiny_llama):
    from vllm import SamplingParams

    rng = random.Random(SEED)
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n)] for n in (30, 150, 300)]
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
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


def test_start_up_warm_up_launches_both_kernels_over_the_engine_cache(triton_llm):
    """``warm_up_runner`` (patch 4 calls it at start-up on the GPU) on the live engine: with
    zero queries every visible key scores the same, so each output row is the mean of the
    values it can see; every block of the warm-up's table is block 0, filled here with
    fresh random values (and restored)."""

    def warm(worker):
        import torch

        from mesa_vllm.attention.warmup import warm_up_runner

        runner = worker.model_runner
        group = runner.attn_groups[0][0]
        builder = group.get_metadata_builder()
        layer = runner.compilation_config.static_forward_context[group.layer_names[0]]
        kv = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
        saved = kv[:, 0].clone()
        kv[:, 0] = torch.randn_like(saved)
        try:
            md = builder.warmup_metadata()
            out = layer.impl.warm_up(kv, md)
            warmed = warm_up_runner(runner)
            T = min(2 * builder.params.train_len, builder.max_model_len - 1)
            values = kv[1, 0].float()  # [block, Hkv, D]: key j reads slot j % block
            G = layer.impl.num_heads // layer.impl.num_kv_heads
            err = 0.0
            for row, p in enumerate((T - 2, T - 1, T)):
                slots = torch.arange(p + 1) % values.shape[0]
                want = values[slots].mean(0).repeat_interleave(G, dim=0)  # [Hq, D]
                err = max(err, float((out[row].float() - want).abs().max()))
            kinds = sorted({int(k) for t in (md.prefill_table, md.decode_table) for k in t.kind})
            # the kernels see the runner's block-table row stride (Triton specialises on it)
            served = runner.input_batch.block_table.block_tables[0].get_device_tensor(1)
            strides = (md.block_table.stride(0), served.stride(0))
            return warmed, err, T, kinds, strides
        finally:
            kv[:, 0] = saved

    ((warmed, err, T, kinds, strides),) = triton_llm.collective_rpc(warm)
    assert warmed == 1
    assert strides[0] == strides[1], strides
    assert T > 64 and len(kinds) == 1, (T, kinds)  # past L: stair segments only
    assert err < 1e-4, err
