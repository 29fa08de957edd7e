"""Hypothesis strategies shared by the plan tests."""

from __future__ import annotations

from hypothesis import strategies as st

from mesa_vllm.plan import MesaParams


def mesa_params(L, F, Lc, Mmax, E=None, split="dynamic") -> st.SearchStrategy[MesaParams]:
    """Random stair ``MesaParams`` with L, F, Lc, Mmax and E drawn from the (lo, hi) ranges
    given; ``E=None`` gives ``stair_width: auto``.  F is clipped to L - 2 (its upper bound).
    ``split`` is the chunk plan ("dynamic" or "fixed")."""
    widths = st.none() if E is None else st.integers(*E)
    return st.builds(
        lambda L, F, Lc, M, E: MesaParams(
            train_len=L,
            first_chunk=min(F, L - 2),
            last_chunk=Lc,
            max_remainder=M,
            stair_width=E,
            split=split,
        ),
        st.integers(*L),
        st.integers(*F),
        st.integers(*Lc),
        st.integers(*Mmax),
        widths,
    )
