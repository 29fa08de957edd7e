"""Hypothesis strategies shared by the plan tests."""

from __future__ import annotations

from hypothesis import strategies as st

from mesa_vllm.plan import MesaParams


def mesa_params(L, F, Lc, Mmax, E=None, split="dynamic") -> st.SearchStrategy[MesaParams]:
    """Random stair ``MesaParams`` with L, F, Lc, Mmax and E drawn from the (lo, hi) ranges
    given; ``E=None`` gives ``stair_width: auto``.  F is clipped to L - 2 (its upper bound).
    ``split`` is the chunk plan ("dynamic" or "fixed"); with "fixed", ``middle_chunk`` is
    either unset (L - F) or drawn from 1 .. L - F, each half of the time.  ``near_window`` is 0
    (the paper's anchor) half of the time, else drawn from 1 .. L - F - 1."""
    widths = st.none() if E is None else st.integers(*E)
    # a fraction of L - F: 0 leaves middle_chunk unset
    middles = st.just(0.0) if split != "fixed" else st.one_of(st.just(0.0), st.floats(0.01, 1.0))

    nears = st.one_of(st.just(0.0), st.floats(0.0, 1.0))  # a fraction of L - F - 1

    def build(L, F, Lc, M, E, frac, near):
        F = min(F, L - 2)
        return MesaParams(
            train_len=L,
            first_chunk=F,
            last_chunk=Lc,
            max_remainder=M,
            stair_width=E,
            split=split,
            middle_chunk=max(1, round(frac * (L - F))) if frac else None,
            near_window=round(near * (L - F - 1)),
        )

    return st.builds(
        build,
        st.integers(*L),
        st.integers(*F),
        st.integers(*Lc),
        st.integers(*Mmax),
        widths,
        middles,
        nears,
    )
