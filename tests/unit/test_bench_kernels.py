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

A = bk.DecodeCfg(64, 4, 3)
B = bk.DecodeCfg(128, 4, 2, tile_rows=32, tail_first=True)
KEYS_TURNED = bk.DecodeCfg(64, 4, 3, turn_query=False)
DEFAULT = bk.DEFAULT_SIZING


def _row(S, cfg, ms, sizing=DEFAULT, splits=None):
    splits = bk.engine_splits(S, sizing, block_n=cfg.block_n) if splits is None else splits
    return dict(S=S, cfg=list(cfg), splits=splits, ms=ms)


def test_engine_splits_follow_the_sequence_not_the_grid():
    # the engine's grid is sized for 128k (128 splits); with ~512 programs over 32 heads a
    # sequence of any length gets ~16 splits, of whole key blocks
    assert bk.tm.decode_num_splits(bk.ENGINE_MAX_LEN, 1, 32) == 128
    assert bk.engine_splits(32768, (8192, 512)) == 16
    assert bk.engine_splits(131072, (8192, 512)) == 16
    assert bk.engine_splits(131072, (2048, 512)) == 64  # split_keys caps the split length
    assert bk.engine_splits(131072, (512, 512)) == 128  # ... and the grid the split count
    assert bk.engine_splits(32768, (8192, 256)) == 8  # fewer programs, fewer splits
    assert bk.engine_splits(16 * 640 + 4, (8192, 512)) == 17  # rounded down to 640: 17, not 14
    # the key floor (DECODE_MIN_SPLIT_KEYS = 128): 1024 keys would get 16 splits of 64
    assert bk.tm.DECODE_MIN_SPLIT_KEYS == 128
    assert bk.engine_splits(1024, (8192, 512)) == 8
    assert bk.engine_splits(4096, (8192, 512)) == 16  # 256 keys per split, above the floor


def test_pick_decode_weighs_every_length_at_the_engines_split_count():
    sweep = [
        _row(4096, A, 1.0), _row(4096, B, 1.5),  # B 50% slower at 4k ...
        _row(131072, A, 10.0), _row(131072, B, 9.0),  # ... 10% faster at 128k: A wins
        _row(131072, B, 1.0, splits=999),  # not an engine split count: ignored
        _row(4096, KEYS_TURNED, 0.1), _row(131072, KEYS_TURNED, 0.1),  # not launchable
    ]  # fmt: skip
    assert bk.pick_decode(sweep) == (A, DEFAULT)
    sweep[1]["ms"] = 1.05
    assert bk.pick_decode(sweep) == (B, DEFAULT)


def test_pick_decode_picks_the_split_sizing():
    sweep = [
        _row(131072, A, 1.5), _row(131072, A, 1.0, (2048, 512)),  # 16 / 64 splits
        _row(32768, A, 1.0), _row(32768, A, 0.5, (8192, 256)),  # 16 / 8 splits
    ]  # fmt: skip
    # 8192 keys with 256 programs: 8 splits at 32k (2x faster), 16 at 128k (1.5x slower)
    assert bk.pick_decode(sweep) == (A, (8192, 256))
    sweep[3]["ms"] = 0.9  # 8 splits gain less: 2048 keys with 512 programs, 64 at 128k
    assert bk.pick_decode(sweep) == (A, (2048, 512))


def test_pick_decode_without_rows_keeps_the_default():
    assert bk.pick_decode([]) == (bk.DECODE_CONFIGS[0], DEFAULT)


@pytest.mark.parametrize("cfg", [c for c in bk.DECODE_CONFIGS if c.launchable])
def test_decode_env_round_trips_to_the_launch_keywords(monkeypatch, cfg):
    monkeypatch.setenv("MESA_VLLM_DECODE_KERNEL", bk.decode_env(cfg, (2048, 256)))
    want = {k: v for k, v in bk._dec_kw(cfg, (2048, 256)).items() if v is not None}
    del want["angle_add"], want["turn_query"], want["max_seq_len"]
    want["tail_first"] = int(cfg.tail_first)
    assert decode_kernel_options() == want


def test_decode_env_refuses_a_config_the_engine_cannot_launch():
    with pytest.raises(ValueError, match="turn_query"):
        bk.decode_env(KEYS_TURNED, DEFAULT)
