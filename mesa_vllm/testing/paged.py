"""Random attention problems over a paged KV cache, shared by the kernel tests and the GPU
kernel benchmark (benchmarks/bench_kernels.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mesa_vllm.plan import MesaParams, Segment, plan_request


@dataclass
class PagedBatch:
    """``key_cache`` / ``value_cache`` [blocks, page, Hkv, D] (a shuffled block order),
    ``block_table`` int32 [reqs, max_blocks]; ``qkv``: per request the full-sequence q
    [S, Hq, D], k / v [S, Hkv, D] (unrotated); ``query`` [rows, Hq, D]: rows ctx.. of each
    request, packed; ``entries``: (req, packed row of the segment's first query, Segment)."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    query: torch.Tensor
    entries: list[tuple[int, int, Segment]]


def random_paged_batch(
    reqs: list[tuple[int, int, int]],
    params: MesaParams,
    Hkv: int,
    G: int,
    D: int,
    page: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    spare_blocks: int,
) -> PagedBatch:
    """Requests ``(T_prompt, seq_len, ctx)``: fresh random q/k/v (CPU) written to a paged cache
    with ``spare_blocks`` unused blocks; the step computes queries ctx..seq_len-1."""
    g = generator
    need = [-(-S // page) for _, S, _ in reqs]
    n_blocks = sum(need) + spare_blocks
    key_cache = torch.randn(n_blocks, page, Hkv, D, generator=g).to(dtype)
    value_cache = torch.randn(n_blocks, page, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(n_blocks, generator=g).to(torch.int32)
    block_table = torch.zeros(len(reqs), max(need), dtype=torch.int32)
    qkv, queries, entries, used, q_off = [], [], [], 0, 0
    for r, (T, S, ctx) in enumerate(reqs):
        block_table[r, : need[r]] = perm[used : used + need[r]]
        used += need[r]
        q = torch.randn(S, Hkv * G, D, generator=g).to(dtype)
        k = torch.randn(S, Hkv, D, generator=g).to(dtype)
        v = torch.randn(S, Hkv, D, generator=g).to(dtype)
        idx = torch.arange(S)
        blocks = block_table[r, idx // page].long()
        key_cache[blocks, idx % page] = k
        value_cache[blocks, idx % page] = v
        qkv.append((q, k, v))
        queries.append(q[ctx:])
        entries += [(r, q_off + s.q_start - ctx, s) for s in plan_request(T, ctx, S, params)]
        q_off += S - ctx
    return PagedBatch(key_cache, value_cache, block_table, qkv, torch.cat(queries), entries)


def reference_rows(
    batch: PagedBatch,
    reqs: list[tuple[int, int, int]],
    params: MesaParams,
    rows: list[int],
    rope: dict | None = None,
) -> torch.Tensor:
    """The dense Mesa reference (``mesa_attention_reference``, fp32) at packed query
    ``rows`` of ``random_paged_batch(reqs, params, ...)``: [len(rows), Hq, D]."""
    from mesa_vllm.testing.reference import mesa_attention_reference

    starts, off = [], 0
    for _, S, ctx in reqs:
        starts.append(off)
        off += S - ctx
    refs: dict[int, torch.Tensor] = {}
    out = []
    for row in rows:
        r = max(k for k in range(len(reqs)) if starts[k] <= row)
        if r not in refs:
            q, k, v = batch.qkv[r]
            refs[r] = mesa_attention_reference(
                q, k, v, reqs[r][0], params.train_len, params.first_chunk, params.last_chunk,
                params.max_remainder, params.stair_width, params.log_n_scaling, rope,
                split=params.split, width=params.middle_chunk, near_window=params.near_window,
                long_scale=params.long_query_scale,
            )  # fmt: skip
        out.append(refs[r][reqs[r][2] + row - starts[r]].float())
    return torch.stack(out)


def quantize_kv(batch: PagedBatch, kv_dtype: torch.dtype, scales: tuple[float, float]):
    """``batch``'s caches stored as an fp8 cache stores them (x / scale, rounded to
    ``kv_dtype``) with per-tensor (k_scale, v_scale) ``scales``, and its dense k / v as the
    kernels read them back (scale * stored).  Returns (key_cache, value_cache, qkv,
    (k_scale, v_scale) fp32 [1] tensors)."""

    def stored(x, sc):
        return (x.float() / sc).to(kv_dtype)

    k_sc, v_sc = scales
    qkv = [(q, stored(k, k_sc).float() * k_sc, stored(v, v_sc).float() * v_sc)
           for q, k, v in batch.qkv]  # fmt: skip
    tensors = tuple(torch.tensor([sc], dtype=torch.float32) for sc in scales)
    return stored(batch.key_cache, k_sc), stored(batch.value_cache, v_sc), qkv, tensors
