"""Host side of the Triton kernels: segment tables, launch options and decode split sizing.

No Triton import: the engine's configuration checks (mesa_vllm/envs.py) and the metadata
builder read this module without loading the kernels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mesa_vllm.plan import MesaParams, Segment
from mesa_vllm.support import PE_RULES

# Segment kinds, ``SegmentTable.kind``: plain causal attention, a middle chunk (reads the
# first chunk then its own), the stair segment (Stair PE), a weave-PE variant's segment.
KIND_CAUSAL = 0
KIND_MIDDLE = 1
KIND_STAIR = 2
KIND_WEAVE = 3
KIND_CODES = {"causal": KIND_CAUSAL, "middle": KIND_MIDDLE, "stair": KIND_STAIR,
              "weave": KIND_WEAVE}  # fmt: skip

# The kernels' ``PE`` constexpr: the engine's position-encoding variant (docs/VARIANTS.md,
# mesa_vllm.support.PE_RULES).  Stair runs the plain Mesa kernels; the others add the weave
# loops.
PE_STAIR = PE_RULES["stair"].code
PE_REROPE = PE_RULES["rerope"].code
PE_LEAKY_REROPE = PE_RULES["leaky_rerope"].code
PE_SELF_EXTEND = PE_RULES["self_extend"].code
PE_STREAMING = PE_RULES["streaming"].code
PE_LM_INFINITE = PE_RULES["lm_infinite"].code
PE_CODES = {name: rule.code for name, rule in PE_RULES.items() if rule.weave}

# Decode split sizing per sequence, in-kernel (``DecodeTuning``'s split_programs / split_keys
# / min_split_keys): ~512 programs, 128 to 8192 keys per split (H200,
# benchmarks/kernels_h200.md; the 128-key floor from benchmarks/decode_batch_h200.md: short
# sequences at small batches fill more of the GPU)
DECODE_SPLIT_PROGRAMS = 512
DECODE_SPLIT_KEYS = 8192
DECODE_MIN_SPLIT_KEYS = 128
# Stair positions per decode tile at least (a 128-key block spans <= 4 positions for E >= 43;
# where a block spans more than the tile's rows, its keys are turned instead)
DECODE_STAIR_ROWS = 4
# Splits the decode reduction merges per step: a fixed block, so a step's split count (it
# follows the batch and its longest sequence) never compiles a kernel variant of its own.
DECODE_REDUCE_SPLITS = 16
_LOG2E = 1.4426950408889634


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------- segment tables


@dataclass
class SegmentTable:
    """Segments of one step on the device, int32 [num_segments] each.

    q_lo: row of the segment's first query in the packed query tensor; q_len: its number of
    queries; q_abs: absolute token index of the first query; kind: ``KIND_CODES``;
    chunk_start: s (middle); anchor: A (stair); width: E (stair, one per segment:
    ``Segment.stair_width``, which with ``stair_width: auto`` depends on the segment's n;
    >= 1 for every segment); req: block-table row.
    tile_seg / tile_q0 (int32 [num_tiles]): per prefill program, the segment and the offset of
    its first query (multiples of ``block_q``), longest key list first.  params: the engine's
    resolved parameters, which the kernels' scalars come from (``first_chunk`` ...
    ``group_size`` below).
    """

    q_lo: torch.Tensor
    q_len: torch.Tensor
    q_abs: torch.Tensor
    kind: torch.Tensor
    chunk_start: torch.Tensor
    anchor: torch.Tensor
    width: torch.Tensor
    req: torch.Tensor
    tile_seg: torch.Tensor
    tile_q0: torch.Tensor
    block_q: int
    params: MesaParams

    @property
    def first_chunk(self) -> int:
        return self.params.first_chunk

    @property
    def train_len(self) -> int:
        return self.params.train_len

    @property
    def log_n(self) -> bool:
        return self.params.log_n_scaling

    @property
    def pe(self) -> int:
        """The kernels' ``PE`` constexpr: the engine's variant whatever segments the table
        holds, so that a CUDA graph captured on causal decodes replays weave ones."""
        return PE_RULES[self.params.pe].code

    @property
    def window(self) -> int:
        """w, or W for the windowed variants."""
        return self.params.window

    @property
    def sink(self) -> int:
        """S for the windowed variants, else 0."""
        return self.params.sink_tokens if self.params.windowed else 0

    @property
    def leaky_factor(self) -> float:
        return float(self.params.leaky_factor)

    @property
    def group_size(self) -> int:
        return self.params.group_size

    @property
    def num_segments(self) -> int:
        return self.q_lo.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tile_seg.shape[0]


def build_segment_table(
    entries: Sequence[tuple[int, int, Segment]],
    params: MesaParams,
    block_q: int,
    device: torch.device | str = "cpu",
) -> SegmentTable:
    """Segment table from ``(req, q_lo, segment)`` triples (req: block-table row; q_lo: row of
    ``segment.q_start`` in the packed query tensor).  One host->device copy."""
    n = len(entries)
    cols = np.zeros((8, n), dtype=np.int64)
    for i, (req, q_lo, seg) in enumerate(entries):
        cols[:, i] = (
            q_lo,
            seg.q_end - seg.q_start,
            seg.q_start,
            KIND_CODES[seg.kind],
            seg.chunk_start,
            seg.anchor,
            seg.stair_width,
            req,
        )
    q_len, q_abs, kind, s = cols[1], cols[2], cols[3], cols[4]
    n_tiles = -(-q_len // block_q)
    tile_seg = np.repeat(np.arange(n), n_tiles)
    starts = np.cumsum(n_tiles) - n_tiles
    tile_q0 = (np.arange(tile_seg.size) - np.repeat(starts, n_tiles)) * block_q
    # Work of a tile ~ list index of its last query: schedule the longest first.
    last = q_abs[tile_seg] + np.minimum(tile_q0 + block_q, q_len[tile_seg]) - 1
    F = params.first_chunk
    work = np.where(kind[tile_seg] == KIND_MIDDLE, F + last - s[tile_seg], last)
    if params.windowed:  # weave tiles read the sinks, the window and their own queries
        short = np.minimum(last, params.sink_tokens + params.window + block_q)
        work = np.where(kind[tile_seg] == KIND_WEAVE, short, work)
    order = np.argsort(-work, kind="stable")
    packed = np.concatenate([cols.reshape(-1), tile_seg[order], tile_q0[order]])
    t = torch.from_numpy(packed.astype(np.int32)).to(device, non_blocking=True)
    nt = tile_seg.size
    parts = list(t[: 8 * n].view(8, n)) + [t[8 * n : 8 * n + nt], t[8 * n + nt :]]
    return SegmentTable(*parts, block_q=block_q, params=params)


def kernel_scalars(table: SegmentTable, scale: float) -> dict[str, float | int]:
    """The kernels' scalar arguments: qk_scale (softmax scale * log2 e), 1 / ln L, the stair
    queries' long_query_scale, F, then the weave scalars: w, S, k, the far-query constant
    (w - w / k for leaky_rerope, w - floor(w / G) for self_extend) and G."""
    w, k, g = table.window, table.leaky_factor, table.group_size
    far_c = {PE_LEAKY_REROPE: w - w / k, PE_SELF_EXTEND: float(w - w // g)}.get(table.pe, 0.0)
    return dict(qk_scale=scale * _LOG2E, inv_log_L=1.0 / math.log(table.train_len),
                long_scale=table.params.long_query_scale, F=table.first_chunk, W=w,
                SINK=table.sink, LEAKY=k, FAR_C=far_c, GROUP=g)  # fmt: skip


def split_prefill_decode(
    entries: Sequence[tuple[int, int, Segment]],
) -> tuple[list[tuple[int, int, Segment]], list[tuple[int, int, Segment]]]:
    """Split entries into (prefill, decode): decode takes every single-query segment."""
    pre = [e for e in entries if e[2].q_end - e[2].q_start > 1]
    dec = [e for e in entries if e[2].q_end - e[2].q_start == 1]
    return pre, dec


def default_block_q(num_queries_per_kv: int, block_m: int = 128) -> int:
    """Queries per prefill tile: the tile's rows are block_q queries x G heads <= block_m."""
    return max(1, block_m // num_queries_per_kv)


# ---------------------------------------------------------------- launch options


def _power_of_2(name: str, value: int | None, least: int) -> None:
    if value is not None and (value < least or value & (value - 1)):
        raise ValueError(f"{name}={value} is not a power of 2 >= {least}")


@dataclass(frozen=True)
class PrefillTuning:
    """Launch options of ``mesa_prefill`` (None: the default).  The engine launches the
    defaults, from the H200 sweep in benchmarks/kernels_h200.md; benchmarks/bench_kernels.py
    sweeps the others.

    block_n: keys per block (64; 32 for heads over 128 or fp32; 16 under the interpreter);
    num_warps (4 for tiles of <= 64 rows, else 8); num_stages (2); fast_trig (libdevice's
    fast cos/sin; on except under the interpreter); angle_add: cos/sin of contiguous key
    positions by angle addition (on).
    """

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    fast_trig: bool | None = None
    angle_add: bool = True


@dataclass(frozen=True)
class DecodeTuning:
    """Launch options of ``mesa_decode`` (None: the default); the engine takes those
    MESA_VLLM_DECODE_KERNEL sets (mesa_vllm/envs.py), defaults from the H200 sweeps in
    benchmarks/kernels_h200.md.

    * block_n (128 for fp16/bf16, 32 for fp32, 16 under the interpreter), num_warps (4),
      num_stages (3).
    * tile_rows: decode tile rows at least (the G heads, padded, x the stair positions NV).
    * tail_first (on): a sequence's busy splits start last to first, so the split holding
      the keys turned as loaded (the slowest) does not start last.
    * Split sizing (``decode_split_sizing``): each sequence gets enough splits for
      ~split_programs programs, of at most split_keys keys (whole key blocks, rounded down;
      0: no per-sequence split, the grid's count alone), at least min_split_keys keys (128 on
      the GPU, one key block under the interpreter), within the grid.
    * fp8_f16_dot (on): over an fp8 cache with a bf16 query, the decode's dots run in fp16
      (``launch_meta``); on the H200 that makes the fp8 decode ~1.3x faster than with bf16
      dots (benchmarks/fp8_kv_h200.md).
    * Not launched by the engine (bench_kernels.py's sweep): fast_trig (on except under the
      interpreter), angle_add (off), turn_query (on: stair keys below the anchor are scored
      with the query turned per stair position; off turns every key instead).

    Tile sizes and warp counts must be powers of 2 (ValueError naming the first that is not).
    """

    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    tile_rows: int = 16
    split_keys: int = DECODE_SPLIT_KEYS
    split_programs: int = DECODE_SPLIT_PROGRAMS
    min_split_keys: int | None = None
    tail_first: bool = True
    fast_trig: bool | None = None
    angle_add: bool = False
    turn_query: bool = True
    fp8_f16_dot: bool = True

    def __post_init__(self) -> None:
        _power_of_2("block_n", self.block_n, 16)
        _power_of_2("num_warps", self.num_warps, 1)
        _power_of_2("tile_rows", self.tile_rows, 16)


# ---------------------------------------------------------------- decode split sizing


def decode_num_splits(
    max_seq_len: int,
    num_rows: int,
    num_kv_heads: int,
    target_programs: int = 1024,
    keys_per_split: int = 1024,
    min_keys: int = 256,
    max_splits: int = 128,
) -> int:
    """The decode grid's split count from host ints only (CUDA graphs: pass the captured
    batch size and max_model_len).  At least ~``target_programs`` programs and one split per
    ``keys_per_split`` keys, never under ``min_keys`` keys per split, at most ``max_splits``.
    Fitted on an H200 (benchmarks/kernels_h200.md).  It is an upper bound: the kernel splits
    each sequence by its own length (``decode_split_sizing``), and given max_seq_len,
    ``mesa_decode`` launches only the splits that sizing can use (``decode_busy_splits``)."""
    want = max(
        -(-target_programs // max(1, num_rows * num_kv_heads)), -(-max_seq_len // keys_per_split)
    )
    return int(max(1, min(want, -(-max_seq_len // min_keys), max_splits)))


def decode_split_sizing(
    heads: int, block_n: int, min_split_keys: int, split_keys: int, split_programs: int
) -> tuple[int, int, int]:
    """(min_split, split_div, split_keys) of the decode kernels' keys per split
    (``split_len_host``) for a launch of ``heads`` (segments x KV heads) programs per split:
    the floor in whole key blocks, the split count that gives ~split_programs programs, the
    cap (0: no per-sequence split, the grid's count alone)."""
    return _cdiv(min_split_keys, block_n) * block_n, max(1, split_programs // heads), split_keys


def split_len_host(
    n_keys: np.ndarray, num_splits: int, min_split: int, split_div: int, split_keys: int,
    block_n: int,
) -> np.ndarray:  # fmt: skip
    """The decode kernels' keys per split (``decode._split_len``) on the host, int64 [N] ->
    [N]: n_keys / num_splits (the grid's splits) at least; at least n_keys / split_div, capped
    at split_keys and rounded down (the sequence's own split count: a grid sized for
    max_model_len would cut a short sequence finer than it should); at least min_split; in
    whole key blocks."""
    n = np.asarray(n_keys, dtype=np.int64)
    own = np.minimum(_cdiv(n, split_div), split_keys) // block_n * block_n  # rounded down
    per = np.maximum(_cdiv(_cdiv(n, num_splits), block_n) * block_n, own)
    return np.maximum(per, min_split)


@functools.lru_cache(maxsize=64)
def decode_busy_splits(
    max_seq_len: int, num_splits: int, min_split: int, split_div: int, split_keys: int,
    block_n: int,
) -> int:  # fmt: skip
    """The most splits ``split_len_host`` keeps busy for a sequence of at most max_seq_len
    keys in a grid of num_splits: the grid a launch needs.  A grid of exactly that many gives
    every sequence the same split length as the larger grid (each split length is a multiple
    of block_n >= n / busy), without the idle programs.

    The split length is a step function of n that only grows, so the busy count peaks at
    the last n before a step: before the per-sequence length gains a block (n = split_div *
    (k * block_n - 1)) or the grid's does (n = num_splits * k * block_n), or at max_seq_len.
    """
    n_max = max(1, max_seq_len)
    k_own = np.arange(1, split_keys // block_n + 2, dtype=np.int64)
    k_grid = np.arange(1, n_max // (num_splits * block_n) + 1, dtype=np.int64)
    n = np.concatenate([split_div * (k_own * block_n - 1), k_grid * num_splits * block_n,
                        [n_max]])  # fmt: skip
    n = n[(n >= 1) & (n <= n_max)]
    per = split_len_host(n, num_splits, min_split, split_div, split_keys, block_n)
    return int(_cdiv(n, per).max())
