"""Which prefill rows go to FlashAttention (mesa_vllm.attention.metadata.take_fresh): only
queries whose Mesa result is plain causal attention over the step's own rotated keys.  The
decision is checked against the plan's key lists, not restated: a segment is fresh exactly
when its keys are [0, q_end) and its queries are [0, q_end) with nothing cached before."""

from __future__ import annotations

import random

import pytest
import torch

from mesa_vllm.attention.metadata import FreshPrefill, fresh_prefill, take_fresh
from mesa_vllm.plan import MesaParams, plan_request

pytestmark = pytest.mark.unit

PARAMS = MesaParams(64, 8, 16, 12, 4)  # L=64, F=8, Lc=16, Mmax=12, E=4


def _entries(reqs):
    """(prompt T, seq_len, ctx) per request -> (req, batch row, segment) as the builder makes."""
    entries, row = [], 0
    for r, (T, seq_len, ctx) in enumerate(reqs):
        for seg in plan_request(T, ctx, seq_len, PARAMS):
            entries.append((r, row + (seg.q_start - ctx), seg))
        row += seq_len - ctx
    return entries


def test_fresh_segments_are_exactly_self_causal():
    rng = random.Random(0)
    for _ in range(300):
        reqs = []
        for _ in range(rng.randint(1, 4)):
            T = rng.randint(2, 6 * PARAMS.train_len)
            ctx = rng.choice([0, 0, rng.randint(1, T - 1)])
            seq_len = rng.randint(ctx + 2, T) if ctx < T - 1 else T
            reqs.append((T, seq_len, ctx))
        entries = [e for e in _entries(reqs) if e[2].q_end - e[2].q_start > 1]
        fresh, rest = take_fresh(entries, PARAMS.train_len)
        assert len(fresh) + len(rest) == len(entries)
        for _, row, seg in entries:
            self_causal = (
                seg.q_start == 0
                and [tuple(r) for r in seg.key_ranges if r[1] > r[0]] == [(0, seg.q_end)]
                and seg.kind != "weave"
            )
            assert ((row, seg.q_end) in fresh) == self_causal, seg


def test_fresh_prefill_rows_and_positions():
    spans = [(3, 5), (8, 2)]  # one span: rows 3..9
    f = fresh_prefill(spans, 3, "cpu")
    assert isinstance(f, FreshPrefill) and f.rows == slice(3, 10)
    assert f.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert f.cu_seqlens.tolist() == [0, 5, 7] and f.cu_seqlens.dtype == torch.int32
    assert f.max_len == 5
    g = fresh_prefill([(0, 3), (7, 4)], 3, "cpu")  # a gap (a decode row, another prefill)
    assert g.rows.tolist() == [0, 1, 2, 7, 8, 9, 10]
    assert g.positions.tolist() == [0, 1, 2, 0, 1, 2, 3]
