"""The decode grid's split count (mesa_vllm/ops/triton/table.py): ``decode_busy_splits``
shrinks the grid sized for max_model_len to the splits a sequence can keep busy, and that
must change no sequence's split length."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mesa_vllm.ops.triton.table import decode_busy_splits, split_len_host

pytestmark = pytest.mark.unit


def _random_sizing(rng: random.Random) -> tuple[int, ...]:
    """(max_seq_len, grid splits, min_split, split_div, split_keys, block_n) as mesa_decode
    derives them (min_split a whole number of blocks; split_keys any positive int)."""
    block_n = rng.choice([16, 32, 64, 128])
    return (
        rng.randint(1, 40000),
        rng.randint(1, 160),
        block_n * rng.randint(1, 8),
        rng.choice([1, 2, 3, 5, 8, 16, 32]),
        rng.randint(1, 9000),
        block_n,
    )


@pytest.mark.parametrize("seed", [random.randrange(1 << 30) for _ in range(3)])
def test_busy_splits_is_the_most_any_sequence_keeps_busy(seed):
    rng = random.Random(seed)
    for _ in range(300):
        max_len, grid, *rest = _random_sizing(rng)
        n = np.arange(1, max_len + 1)
        per = split_len_host(n, grid, *rest)
        busy = -(-n // per)
        got = decode_busy_splits(max_len, grid, *rest)
        assert got == busy.max(), (seed, max_len, grid, rest)
        # the shrunk grid gives every sequence the same split length
        assert np.array_equal(split_len_host(n, got, *rest), per), (seed, max_len, grid, rest)


def test_engine_grid_for_a_128k_engine():
    # one request, 32 KV heads, 512 programs (split_div 16), 512..8192 keys, BLOCK_N 128:
    # a 131144-key sequence needs 17 splits of 8192 keys, the most any needs is 20 (10224
    # keys: 639 per split rounded down to 512), instead of the 128 the grid was sized for
    assert decode_busy_splits(131144, 128, 512, 16, 8192, 128) == 20
