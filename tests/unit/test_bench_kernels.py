"""benchmarks/bench_kernels.py: the decode config it picks for the engine, and the
MESA_VLLM_DECODE_KERNEL value it hands the engine for it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_kernels as bk  # noqa: E402

from mesa_vllm.envs import decode_kernel_options  # noqa: E402

pytestmark = pytest.mark.unit

A = (64, 4, 3, False, True, 16, 0, False)
B = (128, 4, 2, False, True, 32, 0, True)
KEYS_TURNED = (64, 4, 3, False, False, 16, 0, False)


def _row(S, cfg, ms, keys=8192, splits=None):
    splits = bk.engine_splits(S, keys, block_n=cfg[0]) if splits is None else splits
    return dict(S=S, cfg=list(cfg), splits=splits, ms=ms)


def test_engine_splits_follow_the_sequence_not_the_grid():
    # the engine's grid is sized for 128k (128 splits); with ~512 programs over 32 heads a
    # sequence of any length gets ~16 splits, of whole key blocks
    assert bk.tm.decode_num_splits(bk.ENGINE_MAX_LEN, 1, 32) == 128
    assert bk.engine_splits(32768, 8192) == 16
    assert bk.engine_splits(131072, 8192) == 16
    assert bk.engine_splits(131072, 2048) == 64  # split_keys caps the split length
    assert bk.engine_splits(131072, 512) == 128  # ... and the grid the split count
    assert bk.engine_splits(4096 + 4, 8192) == 17  # rounded down to 256: 17 splits, not 11
    assert bk.engine_splits(1000, 8192) == 4  # the 256-key floor


def test_pick_decode_weighs_every_length_at_the_engines_split_count():
    sweep = [
        _row(4096, A, 1.0), _row(4096, B, 1.5),  # B 50% slower at 4k ...
        _row(131072, A, 10.0), _row(131072, B, 9.0),  # ... 10% faster at 128k: A wins
        _row(131072, B, 1.0, splits=999),  # not an engine split count: ignored
        _row(4096, KEYS_TURNED, 0.1), _row(131072, KEYS_TURNED, 0.1),  # not launchable
    ]  # fmt: skip
    assert bk.pick_decode(sweep) == (A, 8192)
    sweep[1]["ms"] = 1.05
    assert bk.pick_decode(sweep) == (B, 8192)


def test_pick_decode_picks_split_keys():
    sweep = [_row(131072, A, 2.0, 8192), _row(131072, A, 1.0, 2048), _row(4096, A, 1.0)]
    assert bk.pick_decode(sweep) == (A, 2048)


def test_pick_decode_without_rows_keeps_the_default():
    assert bk.pick_decode([]) == (bk.DECODE_CONFIGS[0], bk.tm.DECODE_SPLIT_KEYS)


@pytest.mark.parametrize("cfg", [c for c in bk.DECODE_CONFIGS if c[4] and not c[3]])
def test_decode_env_round_trips_to_the_launch_keywords(monkeypatch, cfg):
    monkeypatch.setenv("MESA_VLLM_DECODE_KERNEL", bk.decode_env(cfg, 2048))
    want = {k: v for k, v in bk._dec_kw(cfg, 2048).items() if v is not None}
    del want["angle_add"], want["turn_query"]
    if want.pop("flat_stair"):
        want["flat_stair"] = 1
    assert decode_kernel_options() == want


def test_decode_env_refuses_a_config_the_engine_cannot_launch():
    with pytest.raises(ValueError, match="turn_query"):
        bk.decode_env(KEYS_TURNED, 1024)
