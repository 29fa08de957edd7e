"""Middle chunks as one varlen causal attention call (mesa_vllm.attention.middle_fa): the
step's middle rows, gathered from a paged cache, rotated and attended with FlashAttention's
bottom-right causal convention (here its torch stand-in), equal the dense Mesa reference, for
scheduler splits at arbitrary points, several requests per step, GQA 1/3/4, head dims 32/64,
both chunk plans and an fp8-style scaled cache.  Tolerance: fp32 throughout, atol 2e-5."""

from __future__ import annotations

import random

import pytest
import torch

from mesa_vllm.attention.middle_fa import (
    middle_attention,
    middle_prefill,
    take_middle,
    varlen_causal_attention,
)
from mesa_vllm.ops.rope import RopeSpec, rotate
from mesa_vllm.plan import MesaParams, plan_request
from mesa_vllm.testing.paged import random_paged_batch, reference_rows
from mesa_vllm.testing.reference import rope_inv_freq

pytestmark = pytest.mark.unit

BLOCK = 8
L, F, LC, MMAX, E = 64, 8, 24, 10, 4


def _params(split: str, width: int | None) -> MesaParams:
    return MesaParams(train_len=L, first_chunk=F, last_chunk=LC, max_remainder=MMAX,
                      stair_width=E, split=split, middle_chunk=width)  # fmt: skip


def _step(seed: int, hq: int, hkv: int, d: int, split: str, width: int | None):
    """Three requests past L, each with a random step window [ctx, S) of its prompt, over a
    shuffled paged cache (``random_paged_batch``); (params, reqs, batch)."""
    rng = random.Random(seed)
    params = _params(split, width)
    reqs = []
    for _ in range(3):
        T = rng.randrange(L + 1, 5 * L)
        ctx = rng.randrange(0, T - 1)
        reqs.append((T, rng.randrange(ctx + 1, T + 1), ctx))
    batch = random_paged_batch(reqs, params, hkv, hq // hkv, d, BLOCK, torch.float32,
                               torch.Generator().manual_seed(seed), 4)  # fmt: skip
    return params, reqs, batch


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])  # [blocks, page, Hkv, D] -> [slots, Hkv, D]


@pytest.mark.parametrize(
    "seed,hq,hkv,d,split,width",
    [
        (0, 4, 4, 32, "dynamic", None),
        (1, 6, 2, 64, "dynamic", None),
        (2, 8, 2, 32, "fixed", None),
        (3, 3, 1, 32, "fixed", 16),
        (4, 8, 8, 64, "fixed", 40),
    ],
)
def test_middle_rows_equal_the_dense_reference(seed, hq, hkv, d, split, width):
    params, reqs, batch = _step(seed, hq, hkv, d, split, width)
    mids, rest = take_middle(batch.entries)
    assert all(s.kind == "middle" for _, _, s in mids)
    assert all(s.kind != "middle" for _, _, s in rest)
    if not mids:
        pytest.fail("the drawn steps hold no middle segment: pick another seed")
    spec = RopeSpec(rope_inv_freq(d), d, d)
    mp = middle_prefill(mids, batch.block_table, BLOCK)
    kc, vc = _flat(batch.key_cache), _flat(batch.value_cache)
    out = middle_attention(batch.query, kc, vc, mp, d**-0.5, lambda x, p: rotate(x, p, spec),
                           varlen_causal_attention)  # fmt: skip
    want = reference_rows(batch, reqs, params, mp.rows.tolist())
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


def test_scaled_cache_is_read_back_as_scale_times_stored():
    params, reqs, batch = _step(5, 4, 2, 32, "fixed", 16)
    mids, _ = take_middle(batch.entries)
    spec = RopeSpec(rope_inv_freq(32), 32, 32)
    mp = middle_prefill(mids, batch.block_table, BLOCK)
    rot = lambda x, p: rotate(x, p, spec)  # noqa: E731
    query, kc, vc = batch.query, _flat(batch.key_cache), _flat(batch.value_cache)
    plain = middle_attention(query, kc, vc, mp, 32**-0.5, rot, varlen_causal_attention)
    ks, vs = torch.tensor([0.25]), torch.tensor([4.0])
    scaled = middle_attention(query, kc / 0.25, vc / 4.0, mp, 32**-0.5, rot,
                              varlen_causal_attention, kv_scales=(ks, vs))  # fmt: skip
    torch.testing.assert_close(scaled, plain, atol=1e-6, rtol=1e-6)

    # a cache stored in another dtype than the queries' is read in the queries' dtype
    # (FlashAttention refuses q, k, v of different dtypes; vLLM's rotary keeps the dtype)
    def keep_dtype(x, p):
        return rotate(x, p, spec).to(x.dtype)

    def same_dtypes(q, k, v, mp, scale):
        assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
        return varlen_causal_attention(q, k, v, mp, scale)

    other = middle_attention(query, kc.double(), vc.double(), mp, 32**-0.5, keep_dtype,
                             same_dtypes)  # fmt: skip
    assert other.dtype == query.dtype
    torch.testing.assert_close(other, plain, atol=1e-6, rtol=1e-6)


def test_a_chunk_split_across_steps_reads_its_earlier_keys_from_the_cache():
    params = _params("fixed", 16)
    T = 3 * L
    whole = [s for s in plan_request(T, 0, T, params) if s.kind == "middle"]
    s = whole[1]  # the second middle chunk, resumed from its middle
    mid = (s.q_start + s.q_end) // 2
    part = [x for x in plan_request(T, mid, s.q_end, params) if x.kind == "middle"][0]
    bt = torch.arange(-(-T // BLOCK), dtype=torch.int32)[None, :]
    mp = middle_prefill([(0, 0, part)], bt, BLOCK)
    # keys: the first chunk, then the own chunk from its start (before the step) to the end
    want = list(range(F)) + list(range(s.chunk_start, s.q_end))
    assert mp.k_slots.tolist() == want and mp.k_pos.tolist() == list(range(len(want)))
    assert mp.q_pos.tolist() == [F + p - s.chunk_start for p in range(mid, s.q_end)]
    assert mp.cu_k.tolist() == [0, len(want)] and mp.cu_q.tolist() == [0, s.q_end - mid]


def test_non_middle_entries_are_refused():
    params = _params("dynamic", None)
    causal = plan_request(L, 0, L, params)[0]
    with pytest.raises(ValueError, match="causal segment"):
        middle_prefill([(0, 0, causal)], torch.zeros(1, 8, dtype=torch.int32), BLOCK)


def test_cos_sin_table_is_vllms_rotary_cache():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from mesa_vllm.attention.middle_fa import cos_sin_table
    from mesa_vllm.ops.rope import rope_spec_from_vllm

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=512, is_neox_style=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        dtype=torch.float32)  # fmt: skip
    inv = rope_spec_from_vllm(rope).inv_freq
    torch.testing.assert_close(cos_sin_table(inv, 512, torch.float32), rope.cos_sin_cache)


def test_the_gpu_benchmark_dry_run_checks_against_the_reference(tmp_path):
    """benchmarks/middle_fa.py without CUDA: its reference checks with the torch stand-ins."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import middle_fa as bench

    assert bench.main(["--out", str(tmp_path)]) == 0
    checks = json.loads((tmp_path / "middle_fa.json").read_text())["checks"]
    assert len(checks) == 16 and all(c["ok"] and c["rows"] > 0 for c in checks)
    assert {(c["G"], c["D"], c["split"]) for c in checks} == {
        (g, d, s) for g in (1, 3, 4, 8) for d in (64, 128) for s in ("dynamic", "fixed")
    }
