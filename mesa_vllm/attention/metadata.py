"""Per-step Mesa metadata: the plan of every request, turned into tensors once per step.

The builder runs once per scheduler step (shared by all layers): it splits each request's
queries into plan segments (``mesa_vllm.plan``) and precomputes, per segment, the physical
cache slots of the keys it reads, the (rebased) positions of keys and queries, the log-n
query scales and the causal mask.  ``forward`` then only gathers, rotates and attends.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from mesa_vllm.attention.middle_fa import MiddlePrefill, middle_prefill, take_middle
from mesa_vllm.engine_config import params_from_vllm_config
from mesa_vllm.envs import fresh_prefill_fa, middle_prefill_mode, resolve_kernel
from mesa_vllm.ops.triton.table import (
    SegmentTable,
    build_segment_table,
    decode_num_splits,
    default_block_q,
    split_prefill_decode,
)
from mesa_vllm.plan import ChunkPlan, MesaParams, Segment, chunk_split, plan_request

logger = logging.getLogger("vllm.mesa_vllm")


@dataclass
class SegmentWork:
    """One dense attention problem of the step.

    rows [q_lo, q_hi) of the batch's query tensor; ``key_slots`` [nk] int64 flat cache slots;
    ``key_pos`` [nk] / ``query_pos`` [nq] int64 rebased positions; ``q_scale`` [nq] fp32 or
    None; ``mask`` [nq, nk] bool (True = attend), or None when every query sees every key or
    when ``causal`` (nq == nk: plain top-left causal, no mask materialised).
    """

    kind: str
    q_lo: int
    q_hi: int
    key_slots: torch.Tensor
    key_pos: torch.Tensor
    query_pos: torch.Tensor
    q_scale: torch.Tensor | None
    mask: torch.Tensor | None
    causal: bool = False
    rule: MesaParams | None = None  # weave segments: positions are token indices, see ops.weave


@dataclass
class FreshPrefill:
    """Fresh prompts no longer than L (plain causal attention over the step's own keys), run
    by FlashAttention: batch rows ``rows`` (a slice when they are one span, else int64 [n]),
    ``positions`` int64 [n] (0.. per prompt), ``cu_seqlens`` int32 [k + 1], ``max_len``."""

    rows: slice | torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    fa_version: int


@dataclass
class MesaMetadata:
    """What both paths take: the step's token count and the cache slots of its keys.  The
    builder returns one of the two subclasses, the backend runs the path of its type."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor


@dataclass
class TorchMesaMetadata(MesaMetadata):
    """The torch path (mesa_vllm/ops/torch_mesa.py): one dense problem per segment."""

    segments: list[SegmentWork] = field(default_factory=list)


@dataclass
class TritonMesaMetadata(MesaMetadata):
    """The Triton path (mesa_vllm/ops/triton/): ``prefill_table`` (segments of 2+ queries),
    ``decode_table`` (single-query segments), ``num_splits`` and ``max_seq_len`` (the decode
    grid's host ints), the ``block_table``, ``fresh`` (prompts for FlashAttention, or
    None) and ``middle`` (middle-chunk segments for FlashAttention, or None)."""

    block_table: torch.Tensor
    prefill_table: SegmentTable | None = None
    decode_table: SegmentTable | None = None
    num_splits: int = 1
    max_seq_len: int | None = None
    fresh: FreshPrefill | None = None
    middle: MiddlePrefill | None = None


def take_fresh(
    prefill_entries: list[tuple[int, int, Segment]], train_len: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int, Segment]]]:
    """Split prefill entries ``(req, row, segment)`` into fresh prompts, as (first row, length),
    and the rest.  Fresh: a causal segment from token 0 (nothing cached before it: no prefix
    hit, not a resumed chunk) of at most ``train_len`` tokens, whose keys are exactly its own
    queries, so stock causal attention over the step's rotated q/k is its Mesa result."""
    fresh, rest = [], []
    for entry in prefill_entries:
        _, row, seg = entry
        if seg.kind == "causal" and seg.q_start == 0 and seg.q_end <= train_len:
            fresh.append((row, seg.q_end))
        else:
            rest.append(entry)
    return fresh, rest


def fresh_prefill(spans: list[tuple[int, int]], fa_version: int, device) -> FreshPrefill:
    """FreshPrefill of (first row, length) spans (one host->device copy per tensor)."""
    lengths = [n for _, n in spans]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    one_span = all(spans[i][0] + spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    if one_span:
        rows: slice | torch.Tensor = slice(spans[0][0], spans[0][0] + int(cu[-1]))
    else:
        idx = np.concatenate([np.arange(r, r + n) for r, n in spans]).astype(np.int64)
        rows = torch.from_numpy(idx).to(device, non_blocking=True)
    return FreshPrefill(
        rows,
        torch.from_numpy(positions).to(device, non_blocking=True),
        torch.from_numpy(cu).to(device, non_blocking=True),
        max(lengths),
        fa_version,
    )


def flash_attn_version(model_dtype: torch.dtype, device: torch.device) -> int | None:
    """vLLM's FlashAttention version usable here, or None (not CUDA, fp32, no FlashAttention
    build)."""
    if device.type != "cuda" or model_dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import (
            get_flash_attn_version,
            is_flash_attn_varlen_func_available,
        )
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

        version = get_flash_attn_version()
        if version is None or not is_flash_attn_varlen_func_available():
            return None
        return version if is_fa_version_supported(version) else None
    except Exception:  # noqa: BLE001 - no FlashAttention build: the Mesa kernels serve all
        return None


@lru_cache(maxsize=4096)
def _cached_split(prompt_len: int, params: MesaParams) -> ChunkPlan:
    return chunk_split(prompt_len, params)


def segment_tensors(
    seg: Segment, params: MesaParams, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Key indices [nk], key positions [nk], query positions [nq] (int64, rebased so the
    smallest key position is 0), query scales [nq] fp32 (or None) and mask [nq, nk] (or None).
    """
    kidx = torch.cat([torch.arange(a, b, device=device) for a, b in seg.key_ranges if b > a])
    qidx = torch.arange(seg.q_start, seg.q_end, device=device)
    if seg.kind == "weave":  # the pair decides the position (ops.weave): keep the indices
        kpos, qpos = kidx, qidx
    else:
        kpos = _positions(seg, kidx)
        qpos = _positions(seg, qidx)
        base = kpos.min()
        kpos, qpos = kpos - base, qpos - base
    scale = None
    if seg.kind in ("stair", "weave") and params.log_n_scaling:
        scale = torch.clamp(
            torch.log((qidx + 1).to(torch.float32)) / torch.log(torch.tensor(params.train_len)),
            min=1.0,
        )
    if seg.kind == "stair" and params.long_query_scale != 1.0:
        ones = torch.ones(qidx.numel(), dtype=torch.float32, device=device)
        scale = (ones if scale is None else scale) * params.long_query_scale
    mask = None
    if seg.kind != "weave" and 1 < qidx.numel() < kidx.numel():
        mask = kidx[None, :] <= qidx[:, None]
    return kidx, kpos, qpos, scale, mask


def _positions(seg: Segment, idx: torch.Tensor) -> torch.Tensor:
    if seg.kind == "middle":
        return torch.where(idx < seg.first, idx, seg.first + (idx - seg.chunk_start))
    if seg.kind == "stair":
        a, e = seg.anchor, seg.stair_width
        return torch.where(idx >= a, idx, a - 1 - torch.div(a - 1 - idx, e, rounding_mode="floor"))
    return idx


class MesaMetadataBuilder(AttentionMetadataBuilder[MesaMetadata]):
    """Plans every step.  With the Triton kernels on CUDA, batches of single-token decodes
    are CUDA-graph safe (``UNIFORM_SINGLE_TOKEN_DECODE``: vLLM captures them whole): their
    segment table lives in persistent buffers, padded requests get harmless entries, and the
    split count depends only on the batch size and max_model_len."""

    _cudagraph_support = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        from vllm.platforms import current_platform

        if current_platform.is_cuda() and resolve_kernel("cuda") == "triton":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.params = params_from_vllm_config(vllm_config)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.kernel = resolve_kernel(torch.device(device).type)
        self.max_model_len = vllm_config.model_config.max_model_len
        # columns of the runner's block table (vLLM's InputBatch sizes it this way)
        self.block_table_width = kv_cache_spec.max_num_blocks_per_req(
            vllm_config, self.max_model_len
        )
        # padded CUDA-graph batches can hold more requests than max_num_seqs
        self.max_num_reqs = max(
            vllm_config.scheduler_config.max_num_seqs,
            vllm_config.compilation_config.max_cudagraph_capture_size or 0,
        )
        self._decode_buffers: dict[str, torch.Tensor] = {}  # persistent decode-table rows
        self.block_q = default_block_q(num_heads // self.num_kv_heads)  # Triton prefill tiles
        fa = None  # Triton path: FlashAttention's version, when this GPU has it
        if self.kernel == "triton":
            fa = flash_attn_version(vllm_config.model_config.dtype, torch.device(device))
        # fresh prompts within L through FlashAttention (MESA_VLLM_FRESH_FA)
        self.fa_version = fa if fresh_prefill_fa() else None
        # middle chunks as one varlen call: "flash" (needs FlashAttention), "torch" or None
        self.middle_mode = middle_prefill_mode() if self.kernel == "triton" else None
        self.middle_fa_version = fa if self.middle_mode == "flash" else None
        if self.middle_mode == "flash" and fa is None:
            logger.warning(
                "MESA_VLLM_MIDDLE_FA=1 needs vLLM's FlashAttention on a CUDA GPU with an fp16 "
                "or bf16 model; middle chunks run on the Mesa Triton kernel instead"
            )
            self.middle_mode = None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> MesaMetadata:
        cm = common_attn_metadata
        prompt_lens = cm.rswa_prefix_lens
        if prompt_lens is None:
            raise RuntimeError(
                "Mesa backend: vLLM did not pass per-request prompt lengths "
                "(mesa_vllm.engine_config must set model_arch_config.rswa_window)"
            )
        prompt_lens = prompt_lens.tolist()
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens = (
            cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens
        ).tolist()
        entries: list[tuple[int, int, Segment]] = []  # (request, row of q_start, segment)
        padded: list[int] = []  # requests with no query (CUDA-graph batch padding)
        for r in range(cm.num_reqs):
            q_len = qsl[r + 1] - qsl[r]
            if q_len <= 0:
                padded.append(r)
                continue
            seq_len = int(seq_lens[r])
            T = int(prompt_lens[r])
            ctx = seq_len - q_len
            plan = _cached_split(T, self.params)
            for seg in plan_request(T, ctx, seq_len, self.params, plan):
                entries.append((r, qsl[r] + (seg.q_start - ctx), seg))
        if self.kernel == "triton":
            return self._triton_metadata(cm, entries, max(seq_lens, default=1), padded, qsl)
        return self._torch_metadata(cm, entries)

    def _torch_metadata(
        self, cm: CommonAttentionMetadata, entries: list[tuple[int, int, Segment]]
    ) -> TorchMesaMetadata:
        block_table = cm.block_table_tensor
        device = block_table.device
        segments: list[SegmentWork] = []
        for r, lo, seg in entries:
            kidx, kpos, qpos, scale, mask = segment_tensors(seg, self.params, device)
            slots = block_table[r, kidx // self.block_size].to(torch.int64) * self.block_size
            slots = slots + kidx % self.block_size
            nq = seg.q_end - seg.q_start
            causal = seg.kind != "weave" and 1 < nq == kidx.numel()
            rule = self.params if seg.kind == "weave" else None
            segments.append(
                SegmentWork(seg.kind, lo, lo + nq, slots, kpos, qpos, scale, mask, causal, rule)
            )
        return TorchMesaMetadata(cm.num_actual_tokens, cm.slot_mapping, segments)

    def _triton_metadata(
        self, cm: CommonAttentionMetadata, entries, max_seq_len: int, padded, qsl
    ) -> TritonMesaMetadata:
        device = cm.block_table_tensor.device
        pre, dec = split_prefill_decode(entries)
        md = TritonMesaMetadata(cm.num_actual_tokens, cm.slot_mapping, cm.block_table_tensor)
        if pre:  # a step with prefill (never a CUDA graph): tables sized for this step
            spans = []
            if self.fa_version is not None:
                spans, pre = take_fresh(pre, self.params.train_len)
            if spans:
                md.fresh = fresh_prefill(spans, self.fa_version, device)
            if self.middle_mode is not None:
                mids, pre = take_middle(pre)
                if mids:
                    md.middle = middle_prefill(
                        mids,
                        cm.block_table_tensor,
                        self.block_size,
                        self.middle_fa_version,
                        device,
                    )
            if pre:
                md.prefill_table = build_segment_table(pre, self.params, self.block_q, device)
            md.max_seq_len = int(max_seq_len)
            md.num_splits = decode_num_splits(md.max_seq_len, len(dec), self.num_kv_heads)
            if dec:
                md.decode_table = build_segment_table(dec, self.params, 1, device)
            return md
        if not dec:
            return md
        # Pure decode: a batch vLLM may capture or replay as one CUDA graph.  Padded requests
        # (no query) read key 0 of their (null) block-table row and write a padding row.
        first_pad_row = qsl[cm.num_reqs]
        for i, r in enumerate(padded):
            if first_pad_row + i >= cm.num_actual_tokens:
                break
            dec.append((r, first_pad_row + i, Segment("causal", 0, 1)))
        table = build_segment_table(dec, self.params, 1, device)
        md.decode_table = self._persistent(table, len(dec))
        md.max_seq_len = self.max_model_len
        md.num_splits = decode_num_splits(self.max_model_len, len(dec), self.num_kv_heads)
        return md

    def warmup_metadata(self) -> TritonMesaMetadata | None:
        """A step that launches both Triton kernels as serving does (same tables, tile sizes,
        decode grid and block-table row stride: Triton specialises integer arguments such as
        that stride on divisibility by 16), for start-up (``mesa_vllm.attention.warmup``):
        rows 0-1 are the last two prompt tokens of a prompt of T = min(2 L, max_model_len - 1)
        tokens, row 2 decodes token T.  The block table points every block at block 0, so the
        launch reads only the cache and writes only its output.  None on the torch path."""
        if self.kernel != "triton":
            return None
        device = self.device
        T = max(2, min(2 * self.params.train_len, self.max_model_len - 1))
        pre = [(0, seg.q_start - (T - 2), seg) for seg in plan_request(T, T - 2, T, self.params)]
        dec = [(0, 2, seg) for seg in plan_request(T, T, T + 1, self.params)]
        md = TritonMesaMetadata(
            3,
            torch.full((3,), -1, dtype=torch.int64, device=device),
            torch.zeros(1, self.block_table_width, dtype=torch.int32, device=device),
        )
        md.prefill_table = build_segment_table(pre, self.params, self.block_q, device)
        md.decode_table = build_segment_table(dec, self.params, 1, device)
        md.max_seq_len = self.max_model_len
        md.num_splits = decode_num_splits(self.max_model_len, 1, self.num_kv_heads)
        return md

    def _persistent(self, table, n: int):
        """The table with every per-segment tensor [n] moved into a persistent buffer (same
        address every step for a given n, so a captured graph reads this step's values)."""
        if n > self.max_num_reqs:
            return table
        moved = {}
        for f in dataclasses.fields(table):
            value = getattr(table, f.name)
            if isinstance(value, torch.Tensor) and value.shape == (n,):
                buf = self._decode_buffers.get(f.name)
                if buf is None:
                    buf = torch.zeros(self.max_num_reqs, dtype=value.dtype, device=value.device)
                    self._decode_buffers[f.name] = buf
                buf[:n].copy_(value)
                moved[f.name] = buf[:n]
        return dataclasses.replace(table, **moved)
