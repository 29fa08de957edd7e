"""plan.py against the contract (DESIGN.md section 3) and against the independent dense
reference (mesa_vllm/ops/reference.py), with property tests over random parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mesa_vllm.attention.metadata import segment_tensors
from mesa_vllm.ops.reference import query_scales, reference_positions, reference_split
from mesa_vllm.plan import MesaParams, dynamic_split, log_n_scale, plan_request, stair_position

pytestmark = pytest.mark.unit


def test_dynamic_split_worked_examples():
    p = MesaParams(train_len=4096, first_chunk=100, last_chunk=512, max_remainder=200)
    # T = 16384: X = 15772, L - F = 3996, Nq = 3, M = 3784 >= 200 -> C = 15772 // 4 = 3943
    plan = dynamic_split(16384, p)
    assert (plan.width, plan.n_mid, plan.last_start) == (3943, 4, 100 + 4 * 3943)
    # T = 8700: X = 8088, Nq = 2, M = 96 < 200 -> C = 3996, 2 middle chunks
    plan = dynamic_split(8700, p)
    assert (plan.width, plan.n_mid, plan.last_start) == (3996, 2, 8092)
    assert not dynamic_split(4096, p).is_long


def test_stair_figure_1():
    # anchor A = 6, E = 2: query 9 sees keys 0..9 at relative positions 6 6 5 5 4 4 3 2 1 0
    rel = [9 - stair_position(j, 6, 2) for j in range(10)]
    assert rel == [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]


def test_log_n_scale():
    assert log_n_scale(10, 256) == 1.0
    assert log_n_scale(4095, 256) == pytest.approx(1.5)


params_st = st.builds(
    lambda L, F, Lc, M, E: MesaParams(
        train_len=L, first_chunk=min(F, L - 2), last_chunk=Lc, max_remainder=M, stair_width=E
    ),
    st.integers(8, 48),
    st.integers(1, 20),
    st.integers(1, 40),
    st.integers(0, 30),
    st.integers(1, 9),
)


@settings(max_examples=60, deadline=None)
@given(
    params=params_st,
    T=st.integers(1, 300),
    gen=st.integers(0, 40),
    cut=st.integers(0, 400),
    data=st.data(),
)
def test_segments_match_reference(params, T, gen, cut, data):
    """Every query's key set and positions equal the dense reference, wherever the scheduler
    cuts the step ([q0, q1) is an arbitrary window of the sequence)."""
    S = T + gen
    q0 = min(cut, S - 1)
    q1 = data.draw(st.integers(q0 + 1, S))
    L, F, Lc, Mm, E = (
        params.train_len,
        params.first_chunk,
        params.last_chunk,
        params.max_remainder,
        params.stair_width,
    )
    mask, qpos, kpos = reference_positions(T, S, L, F, Lc, Mm, E)
    if T > L:
        plan = dynamic_split(T, params)
        assert (plan.width, plan.n_mid) == reference_split(T, L, F, Lc, Mm)
    want_scale = query_scales(T, S, L, True, F=F, Lc=Lc, Mmax=Mm)
    covered = []
    for seg in plan_request(T, q0, q1, params):
        kidx, kp, qp, scale, m = segment_tensors(seg, params)
        if m is None and len(kidx) == seg.q_end - seg.q_start > 1:  # plain causal, no mask
            m = kidx[None, :] <= torch.arange(seg.q_start, seg.q_end)[:, None]
        for i, p in enumerate(range(seg.q_start, seg.q_end)):
            covered.append(p)
            allowed = kidx[m[i]] if m is not None else kidx
            assert torch.equal(allowed, torch.nonzero(mask[p]).flatten())
            sel = kp[m[i]] if m is not None else kp
            # positions equal up to the rebase (only differences matter)
            assert torch.equal(qp[i] - sel, qpos[p] - kpos[p, allowed])
            got_scale = 1.0 if scale is None else float(scale[i])
            assert got_scale == pytest.approx(float(want_scale[p]), rel=1e-6)
    assert covered == list(range(q0, q1))


def test_middle_chunk_cost_is_linear():
    """Keys read by the prefill of a 64x-long prompt stay O(T (F + C)), not O(T^2)."""
    p = MesaParams(train_len=64, first_chunk=8, last_chunk=24, max_remainder=10)
    T = 64 * 64
    keys = sum(
        (s.q_end - s.q_start) * sum(b - a for a, b in s.key_ranges)
        for s in plan_request(T, 0, T, p)
        if s.kind != "stair"
    )
    assert keys <= T * (8 + 64)


# ------------------------------------------------------------------ weave-PE variants

PES = ("rerope", "leaky_rerope", "self_extend", "streaming", "lm_infinite")


@st.composite
def variant_st(draw):
    L = draw(st.integers(8, 40))
    pe = draw(st.sampled_from(PES))
    chunked = pe not in ("streaming", "lm_infinite") and draw(st.booleans())
    sink = draw(st.integers(0, 4))
    if pe == "streaming":
        w = draw(st.integers(1, max(1, L - sink)))
    else:
        w = draw(st.integers(1, L - 1))
    return MesaParams(
        train_len=L,
        first_chunk=draw(st.integers(1, L - 2)),
        last_chunk=draw(st.integers(1, 30)),
        max_remainder=draw(st.integers(0, 20)),
        stair_width=draw(st.integers(1, 6)),
        log_n_scaling=draw(st.booleans()),
        pe=pe,
        chunked_prefill=chunked,
        window=w,
        leaky_factor=draw(st.sampled_from([1.0, 1.5, 2.0, 7.25])),
        group_size=draw(st.integers(1, 9)),
        sink_tokens=sink,
    )


def _spec(params: MesaParams):
    from mesa_vllm.ops.reference_variants import VariantSpec

    return VariantSpec(
        pe=params.pe,
        chunked_prefill=params.chunked_prefill,
        window=params.window,
        leaky_factor=params.leaky_factor,
        group_size=params.group_size,
        sink_tokens=params.sink_tokens,
        log_n=params.log_n_scaling,
        F=params.first_chunk,
        Lc=params.last_chunk,
        Mmax=params.max_remainder,
        E=params.stair_width,
    )


@settings(max_examples=80, deadline=None)
@given(params=variant_st(), T=st.integers(1, 200), gen=st.integers(0, 30), data=st.data())
def test_variant_segments_match_reference(params, T, gen, data):
    """Plan + torch-path geometry (ops.weave) of every query equal the independent reference
    of docs/VARIANTS.md: visible keys, relative position of every pair, query scale."""
    from mesa_vllm.ops.reference_variants import variant_rel_positions
    from mesa_vllm.ops.weave import far_key_positions, far_query_positions, visible_and_near

    S = T + gen
    q0 = data.draw(st.integers(0, S - 1))
    q1 = data.draw(st.integers(q0 + 1, S))
    mask, rel, qscale = variant_rel_positions(T, S, params.train_len, _spec(params))
    covered = []
    for seg in plan_request(T, q0, q1, params):
        kidx, kp, qp, scale, m = segment_tensors(seg, params)
        for i, p in enumerate(range(seg.q_start, seg.q_end)):
            covered.append(p)
            if seg.kind == "weave":
                pt = torch.tensor([p])
                vis, near = visible_and_near(pt, kidx, params)
                allowed = kidx[vis[0]]
                fq = far_query_positions(pt, params).double()
                fk = far_key_positions(allowed, params).double()
                got = torch.where(near[0][vis[0]], (p - allowed).double(), fq - fk)
            else:
                if m is None and len(kidx) == seg.q_end - seg.q_start > 1:
                    m = kidx[None, :] <= torch.arange(seg.q_start, seg.q_end)[:, None]
                allowed = kidx[m[i]] if m is not None else kidx
                sel = kp[m[i]] if m is not None else kp
                got = (qp[i] - sel).double()
            assert torch.equal(allowed, torch.nonzero(mask[p]).flatten()), (seg, p)
            torch.testing.assert_close(got, rel[p, allowed], rtol=0, atol=1e-5)
            got_scale = 1.0 if scale is None else float(scale[i])
            assert got_scale == pytest.approx(float(qscale[p]), rel=1e-6)
    assert covered == list(range(q0, q1))


def test_windowed_variants_read_sinks_and_window_only():
    """streaming / lm_infinite prefill reads O(T * (S + W)) keys, not O(T^2)."""
    p = MesaParams(
        train_len=64, first_chunk=8, pe="streaming", chunked_prefill=False, window=60, sink_tokens=4
    )
    T = 64 * 32
    reads = 0
    for q in range(0, T, 256):  # the scheduler's chunked prefill: 256-token steps
        for s in plan_request(T, q, q + 256, p):
            reads += sum(b - a for a, b in s.key_ranges)
    assert reads <= (T // 256) * (4 + 60 + 256)
