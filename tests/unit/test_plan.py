"""plan.py against the contract (docs/CONTRACT.md) and against the independent dense
reference (mesa_vllm/testing/reference.py), with property tests over random parameters."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import mesa_params

from mesa_vllm.attention.metadata import segment_tensors
from mesa_vllm.plan import (
    MesaParams,
    chunk_split,
    dynamic_split,
    fixed_split,
    log_n_scale,
    plan_request,
    stable_prefix,
    stair_anchor,
    stair_position,
    stair_width_for,
)
from mesa_vllm.testing.reference import (
    query_scales,
    reference_positions,
    reference_split,
    reference_stable_prefix,
)

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


params_st = mesa_params(L=(8, 48), F=(1, 20), Lc=(1, 40), Mmax=(0, 30), E=(1, 9))


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
    _check_segments_match_reference(params, T, gen, cut, data)


def _check_segments_match_reference(params, T, gen, cut, data):
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
    sp = params.split
    W = params.middle_chunk
    E_ref = "auto" if E is None else E
    mask, qpos, kpos = reference_positions(
        T, S, L, F, Lc, Mm, E_ref, split=sp, width=W, near_window=params.near_window
    )
    if T > L:
        plan = chunk_split(T, params)
        assert (plan.width, plan.n_mid) == reference_split(T, L, F, Lc, Mm, split=sp, width=W)
    want_scale = query_scales(T, S, L, True, F=F, Lc=Lc, Mmax=Mm, split=sp, width=W)
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


# ------------------------------------------------------------------ stair_width: auto

auto_params_st = mesa_params(L=(8, 48), F=(1, 20), Lc=(1, 40), Mmax=(0, 30))


@settings(max_examples=300, deadline=None)
@given(params=auto_params_st, data=st.data())
def test_auto_stair_width_is_the_smallest_that_fits(params, data):
    """stair_width_for(n, C) is the smallest E >= 1 whose largest relative position (every
    query p of the stair set of n against every key k <= p) is <= L - 1, by brute force over
    E, for the last chunk of a prompt (n = T) and a generated token (n = p + 1 > T)."""
    L = params.train_len
    n = data.draw(st.integers(L + 1, 40 * L))
    T = data.draw(st.sampled_from([n, data.draw(st.integers(1, n))]))
    C = dynamic_split(T, params).width
    A = stair_anchor(n, C, params.near_window)

    def span(e: int) -> int:
        pos = [stair_position(j, A, e) for j in range(n)]
        queries = range(A - 1, n) if T == n else [n - 1]  # the stair queries of that n
        return max(pos[p] - min(pos[: p + 1]) for p in queries)

    brute = next(e for e in range(1, n + 1) if span(e) <= L - 1)
    assert stair_width_for(n, C, params) == brute
    # the closed form of the contract: (n - A) + floor((A - 1) / E) is that largest span
    assert span(brute) == (n - A) + (A - 1) // brute <= L - 1
    fixed = MesaParams(L, params.first_chunk, params.last_chunk, params.max_remainder, 7)
    assert stair_width_for(n, C, fixed) == 7


@settings(max_examples=60, deadline=None)
@given(
    params=auto_params_st,
    T=st.integers(1, 300),
    gen=st.integers(0, 60),
    cut=st.integers(0, 400),
    data=st.data(),
)
def test_auto_segments_match_reference(params, T, gen, cut, data):
    """stair_width auto: plan + torch-path positions equal the reference's own auto rule
    (a search over E on the positions), wherever the scheduler cuts the step; generated
    stair segments are maximal (neighbours sharing an anchor differ in E)."""
    _check_segments_match_reference(params, T, gen, cut, data)
    segs = [s for s in plan_request(T, 0, T + gen, params) if s.kind == "stair"]
    for s in segs:
        n = T if s.q_start < T else s.q_start + 1
        assert s.stair_width == stair_width_for(n, dynamic_split(T, params).width, params)
    for a, b in zip(segs, segs[1:], strict=False):
        if a.q_start >= T and a.anchor == b.anchor:
            assert a.stair_width != b.stair_width, (a, b)


def test_auto_stair_width_worked_example():
    """L = 8192, F = 100 (SmolLM2-135M's setting): a 16x prompt gets E = 18 for its last
    chunk; the first token generated past L (n = L + 1, C = L - F: A = L + 1 - F) already
    needs E = 2 (with E = 1 its span would be F + (L - F) = L)."""
    p = MesaParams(train_len=8192, stair_width=None)
    T = 16 * 8192
    plan = dynamic_split(T, p)
    A = stair_anchor(T, plan.width)
    e = stair_width_for(T, plan.width, p)
    assert (T - A) + (A - 1) // e <= 8191 < (T - A) + (A - 1) // (e - 1)
    assert e == 18
    assert stair_width_for(8193, p.default_width, p) == 2


def test_near_window_worked_example():
    """SmolLM2's setting with the fixed split's C = 1024 (Lc = 512, F = 100) and a 16384-token
    prompt: the prompt's own anchor leaves 1023 tokens at their positions, but the first
    generated token (n = 16385, n - 1 a multiple of C) gets A = n with the paper's rule, so
    even its neighbours sit on the stair.  near_window = 512 moves the anchor to n - 512 for
    512 generated tokens (one segment each), then the paper's anchor takes over again."""
    paper = MesaParams(train_len=8192, split="fixed", middle_chunk=1024)
    near = MesaParams(train_len=8192, split="fixed", middle_chunk=1024, near_window=512)
    T = 16384
    assert stair_anchor(T, 1024) == T - 1023 == stair_anchor(T, 1024, 512)
    assert stair_anchor(T + 1, 1024) == T + 1
    assert stair_anchor(T + 1, 1024, 512) == T + 1 - 512
    segs = [s for s in plan_request(T, T, T + 600, near) if s.kind == "stair"]
    assert [s.anchor for s in segs[:512]] == [p + 1 - 512 for p in range(T, T + 512)]
    assert all(s.q_end - s.q_start == 1 for s in segs[:512])
    assert (segs[512].q_start, segs[512].q_end, segs[512].anchor) == (T + 512, T + 600, T + 1)
    ((seg,),) = [[s for s in plan_request(T, T, T + 1, paper)]]
    assert seg.anchor == T + 1  # the paper's rule: no key at its own position
    with pytest.raises(ValueError, match=re.escape("1 .. train_len - first_chunk - 1 = 8091")):
        MesaParams(train_len=8192, near_window=8092)
    with pytest.raises(ValueError, match="needs pe: stair"):
        MesaParams(train_len=8192, pe="rerope", window=100, near_window=8)


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
    from mesa_vllm.testing.reference_variants import VariantSpec

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
    from mesa_vllm.ops.weave import far_key_positions, far_query_positions, visible_and_near
    from mesa_vllm.testing.reference_variants import variant_rel_positions

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


# ------------------------------------------------------------------ split: fixed

fixed_params_st = mesa_params(
    L=(8, 48), F=(1, 20), Lc=(1, 40), Mmax=(0, 30), E=(1, 9), split="fixed"
)
fixed_auto_params_st = mesa_params(L=(8, 48), F=(1, 20), Lc=(1, 40), Mmax=(0, 30), split="fixed")


def test_fixed_split_worked_examples():
    p = MesaParams(train_len=64, first_chunk=4, last_chunk=16, max_remainder=8, split="fixed")
    # C = 60; T = 230: (230 - 4 - 16) // 60 = 3 middle chunks, last chunk [184, 230): 46 tokens
    plan = fixed_split(230, p)
    assert (plan.width, plan.n_mid, plan.last_start) == (60, 3, 184)
    # T = 70: 70 - 4 < 16 + 60, no middle chunk; everything after F is the last chunk
    assert (fixed_split(70, p).n_mid, fixed_split(70, p).last_start) == (0, 4)
    # T = 80 = F + C + Lc: exactly one middle chunk, last chunk [64, 80) of Lc tokens
    assert (fixed_split(80, p).n_mid, fixed_split(80, p).last_start) == (1, 64)
    assert not fixed_split(64, p).is_long
    assert [stable_prefix(t, p) for t in (1, 64, 65, 79, 80, 230)] == [64, 64, 4, 4, 64, 184]
    assert stable_prefix(230, MesaParams(64, 4, 16, 8)) == 0  # dynamic: nothing shared
    with pytest.raises(ValueError, match="split"):
        MesaParams(64, 4, 16, 8, split="static")


def test_narrow_fixed_split_worked_examples():
    """middle_chunk C = 20 < L - F = 60: T = 230 has (230 - 4 - 16) // 20 = 10 middle chunks,
    the last chunk [204, 230) holds 26 tokens (< Lc + C = 36); a prompt within L shares only
    F + C = 24 tokens, the end of a long prompt's middle chunk 0; T = 65 has 2 middle chunks."""
    p = MesaParams(64, 4, 16, 8, split="fixed", middle_chunk=20)
    plan = fixed_split(230, p)
    assert (plan.width, plan.n_mid, plan.last_start) == (20, 10, 204)
    assert [stable_prefix(t, p) for t in (1, 64, 65, 230)] == [24, 24, 44, 204]
    assert fixed_split(64, p).width == 60  # tokens a short prompt generates past L: L - F
    for bad, msg in ((dict(middle_chunk=61), "1 .. train_len - first_chunk = 60"),
                     (dict(middle_chunk=0), "middle_chunk=0"),
                     (dict(split="dynamic", middle_chunk=20), "needs split: fixed")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(msg)):
            MesaParams(64, 4, 16, 8, **{"split": "fixed", **bad})


@settings(max_examples=300, deadline=None)
@given(params=fixed_params_st, T1=st.integers(1, 400), T2=st.integers(1, 400))
def test_fixed_split_boundaries_do_not_depend_on_T(params, T1, T2):
    """For T1 < T2, every chunk boundary of T1's plan before T1's last chunk is a boundary of
    T2's plan, the last chunk holds [Lc, Lc + C) tokens (all T - F when T - F < Lc), middle
    chunks stay inside L, and the plan is the reference's."""
    T1, T2 = sorted((T1, T2))
    L, F, Lc = params.train_len, params.first_chunk, params.last_chunk

    def boundaries(T):
        plan = fixed_split(T, params)
        if not plan.is_long:
            return [0, T], plan
        return [0] + [plan.middle_start(k) for k in range(plan.n_mid + 1)] + [T], plan

    b1, plan1 = boundaries(T1)
    b2, _ = boundaries(T2)
    assert set(b1[:-1]) <= set(b2)  # the boundaries up to T1's last chunk's start
    for T, plan in ((T1, plan1), (T2, fixed_split(T2, params))):
        assert (plan.width, plan.n_mid) == reference_split(
            T, L, F, Lc, params.max_remainder, split="fixed", width=params.middle_chunk
        )
        if plan.is_long:  # F + C - 1 <= L - 1: middle positions stay < L
            assert plan.width == (params.middle_chunk or L - F) <= L - F
            last = T - plan.last_start
            if T - F < Lc + plan.width:
                assert plan.n_mid == 0 and last == T - F
            else:
                assert Lc <= last < Lc + plan.width


@settings(max_examples=300, deadline=None)
@given(params=fixed_params_st, T=st.integers(1, 400), T2=st.integers(1, 400))
def test_stable_prefix_matches_reference(params, T, T2):
    """stable_prefix = the reference's count of leading non-stair tokens; and every token
    below both requests' stable prefixes has the same rule (keys and positions) in both."""
    L, F, Lc, Mm = params.train_len, params.first_chunk, params.last_chunk, params.max_remainder
    W = params.middle_chunk
    sp = stable_prefix(T, params)
    assert sp == reference_stable_prefix(T, L, F, Lc, Mm, split="fixed", width=W)
    shared = min(sp, stable_prefix(T2, params), T, T2)
    if shared:
        a = reference_positions(T, max(T, shared), L, F, Lc, Mm, 3, split="fixed", width=W)
        b = reference_positions(T2, max(T2, shared), L, F, Lc, Mm, 3, split="fixed", width=W)
        for x, y in zip(a, b, strict=True):  # mask, qpos, kpos of the shared tokens
            cut = (slice(0, shared),) * x.dim()
            assert torch.equal(x[cut], y[cut])


@settings(max_examples=60, deadline=None)
@given(
    params=st.one_of(fixed_params_st, fixed_auto_params_st),
    T=st.integers(1, 300),
    gen=st.integers(0, 40),
    cut=st.integers(0, 400),
    data=st.data(),
)
def test_fixed_segments_match_reference(params, T, gen, cut, data):
    """split: fixed, plan + torch-path tensors = the dense reference, any scheduler window."""
    _check_segments_match_reference(params, T, gen, cut, data)
