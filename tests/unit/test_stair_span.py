"""The startup stair-span check (engine_config.worst_stair_span / _min_stair_width) against a
brute force over every prompt length and every generated token the engine would plan."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import mesa_params

from mesa_vllm.engine_config import (
    _min_stair_width,
    span_of,
    stair_query_span,
    width_runs,
    worst_stair_span,
)
from mesa_vllm.plan import (
    MesaParams,
    chunk_split,
    max_stair_distance,
    plan_request,
    stair_anchor,
    stair_position,
)

pytestmark = pytest.mark.unit


def engine_stair_queries(max_len: int, params: MesaParams, decode: bool = True) -> dict:
    """{(last query index, anchor): (smallest sequence length, its prompt length)} of every
    stair segment plan_request gives any request of at most max_len tokens: prompts of every
    length T, and with ``decode`` their generated tokens up to sequence length max_len.  Each
    segment's largest span is at its last query (positions never decrease with the index).
    Also checks that no causal or middle query sees a relative position >= L."""
    L, F = params.train_len, params.first_chunk
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for T in range(1, max_len + 1):
        for seg in plan_request(T, 0, max_len if decode else T, params):
            q = seg.q_end - 1
            if seg.kind == "stair":
                key = (q, seg.anchor)
                out[key] = min(out.get(key, (q + 1, T)), (q + 1, T))
            elif seg.kind == "middle":
                assert F + (q - seg.chunk_start) < L
            else:
                assert seg.kind == "causal" and q < L
    return out


def brute_spans(queries: dict, e: int) -> list[tuple[int, int, int]]:
    """(span, sequence length, prompt length) of every stair segment's last query at E = e."""
    return [
        (stair_position(q, a, e) - stair_position(0, a, e), n, t)
        for (q, a), (n, t) in queries.items()
    ]


def brute_min_width(queries: dict, train_len: int) -> int:
    e = 1
    while max(s for s, _, _ in brute_spans(queries, e)) >= train_len:
        e += 1
    return e


params_st = st.one_of(
    mesa_params(L=(3, 64), F=(1, 40), Lc=(1, 90), Mmax=(0, 70), E=(1, 12)),
    mesa_params(L=(3, 64), F=(1, 40), Lc=(1, 90), Mmax=(0, 70), E=(1, 12), split="fixed"),
)


@settings(max_examples=200, deadline=None)
@given(params=params_st, max_len=st.integers(1, 700))
def test_width_runs_are_the_chunk_split(params, max_len):
    runs = list(width_runs(max_len, params))
    covered = [t for _, lo, hi in runs for t in range(lo, hi + 1)]
    assert covered == list(range(params.train_len + 1, max_len + 1))
    for c, lo, hi in runs:
        assert {chunk_split(t, params).width for t in range(lo, hi + 1)} == {c}


@settings(max_examples=300, deadline=None)
@given(p=st.integers(0, 5000), c=st.integers(1, 300), e=st.integers(1, 80), data=st.data())
def test_stair_query_span_formula(p, c, e, data):
    """The paper's anchor: r + floor(kC / E); with a near window W <= p: ``span_of``, and both
    equal the largest distance on the positions themselves."""
    k, r = divmod(p, c)
    assert stair_query_span(p, c, e) == r + (k * c) // e == span_of(k * c, r, e)
    w = data.draw(st.integers(0, min(p, c + 20)), label="near_window")
    a = stair_anchor(p + 1, c, w)
    assert p + 1 - a >= w  # at least W tokens keep their own positions
    span = stair_query_span(p, c, e, w)
    assert span == span_of(k * c, r, e, w)
    assert span == max(p - stair_position(j, a, e) for j in range(p + 1))


@settings(max_examples=200, deadline=None)
@given(params=params_st, max_len=st.integers(1, 600))
def test_worst_span_and_recommended_width_match_brute_force(params, max_len):
    """Prompts only, and prompts with their generated tokens: the span equals the brute
    force's, at its smallest sequence length; the recommended E fits and E - 1 does not."""
    L = params.train_len
    for decode in (False, True):
        worst = worst_stair_span(max_len, params, decode=decode)
        queries = engine_stair_queries(max_len, params, decode)
        if max_len <= L:
            assert worst is None and not queries
            continue
        spans = brute_spans(queries, params.stair_width)
        top = max(s for s, _, _ in spans)
        assert worst is not None and worst.span == top
        # the smallest sequence length reaching it, and a prompt length that really gets there
        assert worst.seq_len == min(n for s, n, _ in spans if s == top)
        assert worst.prompt_len <= worst.seq_len
        (seg,) = plan_request(worst.prompt_len, worst.seq_len - 1, worst.seq_len, params)
        assert seg.kind == "stair"
        a, e = seg.anchor, params.stair_width
        q = worst.seq_len - 1
        assert stair_position(q, a, e) - stair_position(0, a, e) == top
        if not decode:
            assert worst.prompt_len == worst.seq_len
            prompt_spans = [max_stair_distance(t, params) for t in range(L + 1, max_len + 1)]
            assert top == max(prompt_spans) == max_stair_distance(worst.seq_len, params)

        e = _min_stair_width(max_len, params, decode=decode)
        assert e >= 1
        assert max(s for s, _, _ in brute_spans(queries, e)) < L
        assert worst_stair_span(max_len, replace(params, stair_width=e), decode).span < L
        if e > 1:
            assert max(s for s, _, _ in brute_spans(queries, e - 1)) >= L
            assert worst_stair_span(max_len, replace(params, stair_width=e - 1), decode).span >= L


def test_toy_model_regression():
    """L = 256, max-model-len 8192, F / Lc / Mmax = 32 / 64 / 32 (configs/tiny-passkey.yaml):
    the old check looked at T = 8192 only and recommended E = 62, but an 8159-token prompt
    still spans 259 with it, and generated tokens span more."""
    L, max_len = 256, 8192
    params = MesaParams(
        train_len=L, first_chunk=32, last_chunk=64, max_remainder=32, stair_width=50
    )

    def at(e: int) -> MesaParams:
        return replace(params, stair_width=e)

    old = next(e for e in range(1, max_len) if max_stair_distance(max_len, at(e)) < L)
    assert old == 62
    assert max_stair_distance(8159, at(old)) == 259  # the prompt

    prompts = engine_stair_queries(max_len, params, decode=False)
    queries = engine_stair_queries(max_len, params, decode=True)
    assert max(s for s, _, _ in brute_spans(prompts, old)) >= L
    assert max(s for s, _, _ in brute_spans(queries, old)) >= L

    new_prompts = brute_min_width(prompts, L)
    new = brute_min_width(queries, L)
    assert new_prompts > old and new >= new_prompts
    assert _min_stair_width(max_len, params, decode=False) == new_prompts
    assert _min_stair_width(max_len, params) == new
    assert (
        worst_stair_span(max_len, at(new)).span < L <= worst_stair_span(max_len, at(new - 1)).span
    )

    worst = worst_stair_span(max_len, at(old), decode=False)
    assert worst == (259, 8159, 8159)
    spans = brute_spans(queries, old)
    top = max(s for s, _, _ in spans)
    assert worst_stair_span(max_len, at(old)).span == top


@pytest.mark.parametrize("max_len", [65536, 1 << 20])
def test_startup_check_is_fast(max_len):
    import time

    params = MesaParams(
        train_len=256, first_chunk=32, last_chunk=64, max_remainder=32, stair_width=64
    )
    t0 = time.perf_counter()
    worst_stair_span(max_len, params)
    worst_stair_span(max_len, params, decode=False)
    _min_stair_width(max_len, params)
    _min_stair_width(max_len, params, decode=False)
    assert time.perf_counter() - t0 < 5.0  # measured < 0.1 s at 1M on a loaded CPU
