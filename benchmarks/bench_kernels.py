"""Mesa Triton kernels on a CUDA GPU: correctness vs the dense reference, then speed.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_kernels.py [--skip-checks] [--skip-sweep]

1. Correctness: ``mesa_prefill`` / ``mesa_decode`` over a shuffled paged cache (several
   requests and phases in one launch, output poisoned with NaN) against
   ``mesa_attention_reference`` run on the CPU in fp32 with fp64 angles.  bf16/fp16 (and one
   fp32 case), head 64/128, GQA 1/4/8, block 16/32/64, prompts L..32L with L scaled down to
   256/512 (the reference is O(S^2) memory: S <= 8192).  Also a CUDA-graph replay of decode
   after the segment table changed in place.
2. Speed, Llama-2-7B shape (Hq = Hkv = 32, D = 128, bf16, L = 4096, F = 100, Lc = 512,
   Mmax = 200, E = 50, block 16): prefill of a whole prompt at 4k/32k/128k vs FA3 causal
   (vllm.vllm_flash_attn, fa_version=3) when importable, else torch SDPA (flash) causal on
   pre-rotated q/k; decode of one token at 4k/32k/128k (CUDA-graph replay) vs FA3
   flash_attn_with_kvcache or SDPA.  Useful FLOPs: 4 * D * Hq * (visible keys summed over
   queries); Mesa's follow its plan (O(T (F + C))), the baseline's full causal attention.
Prints Markdown tables last; writes JSON to $OUT/bench_kernels.json when OUT is set.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_kernels.py --variants

runs the weave-PE variants (docs/VARIANTS.md) instead: for each pe (rerope, leaky_rerope,
self_extend, streaming, lm_infinite; chunked prefill on and off where allowed) a check of
both kernels against ``variant_attention_reference`` (run on the GPU in fp32 with fp64
angles; bf16/fp16 and one fp32, head 64/128, GQA 1/4/8, block 16/32/64, prompts below L to
32 L with L = 256/512 and the variant defaults of a 32 L max-model-len), then prefill of a
32k prompt and decode at 32k per variant at the Llama-2-7B shape (stair for reference), and
at 4k (causal segments: each PE specialisation's plain path against stair's).
Writes $OUT/bench_variants.json and .md.  Needs torch + triton only (no vLLM).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesa_vllm.ops.triton import table as tm  # noqa: E402
from mesa_vllm.ops.triton.decode import mesa_decode  # noqa: E402
from mesa_vllm.ops.triton.prefill import mesa_prefill  # noqa: E402
from mesa_vllm.plan import MesaParams, dynamic_split, plan_request  # noqa: E402
from mesa_vllm.support import (  # noqa: E402
    PE_RULES,
    default_leaky_factor,
    smallest_group_size,
)
from mesa_vllm.testing.paged import quantize_kv, random_paged_batch  # noqa: E402
from mesa_vllm.testing.reference import mesa_attention_reference, rope_inv_freq  # noqa: E402
from mesa_vllm.testing.reference_variants import (  # noqa: E402
    VariantSpec,
    variant_attention_reference,
)

ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_PAPER = MesaParams(train_len=4096)  # the product's defaults: F, Lc, Mmax, E
LLAMA2 = dict(L=4096, F=_PAPER.first_chunk, Lc=_PAPER.last_chunk, Mmax=_PAPER.max_remainder,
              E=_PAPER.stair_width)  # fmt: skip
DEV = "cuda"  # a dry run under the Triton interpreter sets "cpu"
SPEED_SHAPE = (128, 32, 16)  # head size, heads (Hq = Hkv), cache block size


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- problem builder


def build(reqs, D, Hkv, G, page, dtype, params, seed, rope=ROPE, with_ref=True, block_q=None,
          kv_dtype=None):  # fmt: skip
    """Paged cache + packed queries for requests (T_prompt, seq_len, ctx) on the GPU.

    Returns dict: query [n, Hq, D], key_cache/value_cache [blocks, page, Hkv, D], block_table
    int32 [reqs, max_blocks], prefill/decode SegmentTables, ref [n, Hq, D] fp32 (CPU) or None,
    kv_scales (None, or with kv_dtype an fp8 cache's scales, from the amax; the reference
    then reads the keys and values back as the kernels do: ``quantize_kv``).
    """
    dev = DEV
    batch = random_paged_batch(
        reqs, params, Hkv, G, D, page, dtype, torch.Generator().manual_seed(seed), 7
    )
    key_cache, value_cache, qkv, kv_scales = batch.key_cache, batch.value_cache, batch.qkv, None
    if kv_dtype is not None:
        amax = (float(c.abs().max()) / 200 for c in (batch.key_cache, batch.value_cache))
        key_cache, value_cache, qkv, kv_scales = quantize_kv(batch, kv_dtype, tuple(amax))
        kv_scales = tuple(t.to(dev) for t in kv_scales)
    refs = []
    for (T, _, ctx), (q, k, v) in zip(reqs, qkv, strict=True):
        if with_ref and params.pe != "stair":
            refs.append(variant_ref(q, k, v, T, params, rope, D**-0.5)[ctx:].float().cpu())
        elif with_ref:
            ref = mesa_attention_reference(
                q,
                k,
                v,
                T,
                params.train_len,
                params.first_chunk,
                params.last_chunk,
                params.max_remainder,
                params.stair_width,
                params.log_n_scaling,
                rope,
                D**-0.5,
            )
            refs.append(ref[ctx:].float())
    entries = batch.entries
    pre, dec = tm.split_prefill_decode(entries)
    bq = block_q or tm.default_block_q(G)
    return dict(
        query=batch.query.to(dev),
        key_cache=key_cache.to(dev),
        value_cache=value_cache.to(dev),
        kv_scales=kv_scales,
        block_table=batch.block_table.to(dev),
        pre=tm.build_segment_table(pre, params, bq, dev) if pre else None,
        dec=tm.build_segment_table(dec, params, 1, dev) if dec else None,
        ref=torch.cat(refs) if with_ref else None,
        inv=rope_inv_freq(D, rope).to(dev),
        scale=D**-0.5,
    )


def run(pb, num_splits=4, out=None, pre_kw=None, dec_kw=None):
    """Both kernels over a problem from ``build``; returns output [n, Hq, D].  pre_kw:
    ``PrefillTuning`` keywords; dec_kw: ``DecodeTuning`` keywords and max_seq_len."""
    out = torch.full_like(pb["query"], float("nan")) if out is None else out
    args = (pb["query"], pb["key_cache"], pb["value_cache"], pb["block_table"])
    if pb["pre"] is not None:
        tuning = tm.PrefillTuning(**(pre_kw or {}))
        mesa_prefill(*args, pb["pre"], pb["inv"], pb["scale"], out, tuning=tuning,
                     kv_scales=pb.get("kv_scales"))  # fmt: skip
    if pb["dec"] is not None:
        kw = dict(dec_kw or {})
        max_seq_len = kw.pop("max_seq_len", None)
        mesa_decode(*args, pb["dec"], pb["inv"], pb["scale"], out, num_splits,
                    max_seq_len=max_seq_len, tuning=tm.DecodeTuning(**kw),
                    kv_scales=pb.get("kv_scales"))  # fmt: skip
    return out


def variant_ref(q, k, v, T, params: MesaParams, rope, scale):
    """``variant_attention_reference`` of one sequence, on the GPU when there is one (it only
    creates tensors on the default device), else on the CPU."""
    spec = VariantSpec(
        params.pe, params.chunked_prefill, params.window, params.leaky_factor,
        params.group_size, params.sink_tokens, params.log_n_scaling, params.first_chunk,
        params.last_chunk, params.max_remainder, params.stair_width,
    )  # fmt: skip
    args = (T, params.train_len, spec, rope, scale)
    if DEV == "cuda":
        try:
            with torch.device(DEV):
                return variant_attention_reference(q.to(DEV), k.to(DEV), v.to(DEV), *args)
        except Exception as e:  # noqa: BLE001 - fall back to the CPU
            log(f"variant reference on the GPU failed ({type(e).__name__}: {e}); CPU instead")
    return variant_attention_reference(q, k, v, *args)


# ---------------------------------------------------------------- correctness

CHECKS = [
    # name, dtype, D, Hkv, G, page, (L, F, Lc, Mmax, E), requests (T, seq_len, ctx), splits
    (
        "bf16 D128 G1 p16 32L prefill",
        torch.bfloat16,
        128,
        4,
        1,
        16,
        (256, 16, 64, 32, 8),
        [(8192, 8192, 0)],
        4,
    ),
    (
        "fp16 D64 G4 p32 chunked+short+decode",
        torch.float16,
        64,
        2,
        4,
        32,
        (256, 16, 64, 32, 8),
        [(4096, 4096, 2048), (300, 300, 0), (256, 256, 0), (1000, 1040, 1039)],
        8,
    ),
    (
        "bf16 D128 G8 p64 L..10L+decode",
        torch.bfloat16,
        128,
        1,
        8,
        64,
        (512, 100, 128, 50, 16),
        [(2048, 2048, 0), (600, 700, 699), (5000, 5001, 5000), (512, 512, 0)],
        16,
    ),
    (
        "bf16 D64 G1 p16 gen+chunk",
        torch.bfloat16,
        64,
        8,
        1,
        16,
        (512, 32, 128, 50, 16),
        [(3000, 3100, 2900), (513, 600, 513), (100, 1500, 1499)],
        5,
    ),
    (
        "bf16 D128 G1 p16 decode 1..32L",
        torch.bfloat16,
        128,
        6,
        1,
        16,
        (256, 16, 64, 32, 8),
        [(8000, 8192, 8191), (300, 301, 300), (2000, 4000, 3999), (100, 101, 100)],
        32,
    ),
    (
        "bf16 D128 G4 p16 decode, E 32",
        torch.bfloat16,
        128,
        2,
        4,
        16,
        (512, 32, 128, 50, 32),
        [(8000, 8192, 8191), (600, 601, 600), (3000, 4000, 3999), (200, 201, 200)],
        32,
    ),
    (
        "fp32 D64 G4 p16",
        torch.float32,
        64,
        2,
        4,
        16,
        (256, 16, 64, 32, 8),
        [(1500, 1500, 0), (700, 720, 719)],
        3,
    ),
]
TOL = {torch.bfloat16: (6e-2, 1.5e-2), torch.float16: (1e-2, 3e-3), torch.float32: (2e-3, 1e-4)}


def checks(seed: int) -> list[dict]:
    rows = []
    # every check, then its half-precision ones again over an fp8 (e4m3) cache (the decode's
    # dots in fp16 for a bf16 query: DecodeTuning.fp8_f16_dot), then the bf16 ones over fp8
    # with the decode's dots in bf16 (fp8_f16_dot=0)
    e4m3 = torch.float8_e4m3fn
    fp8 = [(i, c, e4m3, {}) for i, c in enumerate(CHECKS) if c[1] != torch.float32]
    bf16_dot = [(i, c, e4m3, {"fp8_f16_dot": False}) for i, c in enumerate(CHECKS)
           if c[1] == torch.bfloat16]  # fmt: skip
    for i, (name, dtype, D, Hkv, G, page, mp, reqs, splits), kv_dtype, dec_kw in [
        *((i, c, None, {}) for i, c in enumerate(CHECKS)),
        *fp8,
        *bf16_dot,
    ]:
        atol, rtol = TOL[dtype]
        name = name if kv_dtype is None else f"{name} fp8-e4m3 KV"
        name += " bf16 dot" if dec_kw else ""
        try:
            r = one_check(name, dtype, D, Hkv, G, page, MesaParams(*mp), reqs, splits, seed + i,
                          kv_dtype, dec_kw)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - report, keep going (device time is scarce)
            r = dict(
                name=name,
                seed=seed + i,
                nan=-1,
                max_abs=float("nan"),
                rel_l2=float("nan"),
                atol=atol,
                rtol=rtol,
                ok=False,
                error=f"{type(e).__name__}: {e}"[:500],
            )
        log(f"check {r}")
        rows.append(r)
    for G in (4, 1):
        try:
            rows.append(graph_check(seed + 100 + G, G))
        except Exception as e:  # noqa: BLE001
            rows.append(
                dict(
                    name=f"decode CUDA graph G{G}",
                    seed=seed + 100 + G,
                    nan=-1,
                    max_abs=float("nan"),
                    rel_l2=float("nan"),
                    atol=0,
                    rtol=0,
                    ok=False,
                    error=f"{type(e).__name__}: {e}"[:500],
                )
            )
            log(f"check {rows[-1]}")
    return rows


def one_check(name, dtype, D, Hkv, G, page, params, reqs, splits, seed, kv_dtype=None,
              dec_kw=None) -> dict:  # fmt: skip
    t0 = time.time()
    pb = build(reqs, D, Hkv, G, page, dtype, params, seed, kv_dtype=kv_dtype)
    t_ref = time.time() - t0
    out = run(pb, splits, dec_kw=dec_kw)
    torch.cuda.synchronize()
    o = out.float().cpu()
    err = (o - pb["ref"]).abs()
    atol, rtol = TOL[dtype]
    r = dict(
        name=name,
        seed=seed,
        rows=o.shape[0],
        nan=int(o.isnan().sum()),
        max_abs=float(err.nan_to_num(float("inf")).max()),
        rel_l2=float((o - pb["ref"]).norm() / pb["ref"].norm()),
        atol=atol,
        rtol=rtol,
        ref_s=round(t_ref, 1),
    )
    r["ok"] = r["nan"] == 0 and r["max_abs"] <= atol and r["rel_l2"] <= rtol
    return r


def graph_check(seed: int, G: int) -> dict:
    """Capture mesa_decode in a CUDA graph, change the table in place, replay, compare
    (G query heads per KV head: 1 runs the heads kernel)."""
    params = MesaParams(256, 16, 64, 32, 8)
    Hkv = 8 // G
    a = build([(900, 1000, 999), (300, 301, 300)], 128, Hkv, G, 16, torch.bfloat16, params, seed)
    b = build(
        [(900, 1200, 1199), (50, 600, 599)], 128, Hkv, G, 16, torch.bfloat16, params, seed + 1
    )
    # b's cache and block table are larger: give a's graph b's buffers from the start.
    table = a["dec"]
    out = torch.full_like(b["query"], float("nan"))
    args = (b["query"], b["key_cache"], b["value_cache"], b["block_table"])
    kw = dict(max_seq_len=1200)  # the engine's launch: the grid for the longest sequence
    mesa_decode(*args, table, b["inv"], b["scale"], out, 8, **kw)  # warm-up / compile
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        mesa_decode(*args, table, b["inv"], b["scale"], out, 8, **kw)
    for f in ("q_lo", "q_len", "q_abs", "kind", "chunk_start", "anchor", "req"):
        getattr(table, f).copy_(getattr(b["dec"], f))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    o = out.float().cpu()
    err = (o - b["ref"]).abs()
    r = dict(
        name=f"decode CUDA-graph replay G{G}, table changed",
        seed=seed,
        nan=int(o.isnan().sum()),
        max_abs=float(err.nan_to_num(float("inf")).max()),
        rel_l2=float((o - b["ref"]).norm() / b["ref"].norm()),
        atol=6e-2,
        rtol=1.5e-2,
    )
    r["ok"] = r["nan"] == 0 and r["max_abs"] <= 6e-2 and r["rel_l2"] <= 1.5e-2
    log(f"check {r}")
    return r


# ---------------------------------------------------------------- speed


def mesa_flops(T: int, params: MesaParams, D: int, Hq: int) -> float:
    """Useful FLOPs of Mesa prefill of a whole T-token prompt (QK^T and PV, 2 each)."""
    keys = 0
    for s in plan_request(T, 0, T, params, dynamic_split(T, params)):
        a, b = s.q_start, s.q_end  # visible keys: list index + 1
        lo, hi = (
            (params.first_chunk + a - s.chunk_start, params.first_chunk + b - s.chunk_start)
            if s.kind == "middle"
            else (a, b)
        )
        keys += (lo + 1 + hi) * (hi - lo) // 2
    return 4.0 * D * Hq * keys


def bench_ms(fn, graph=False) -> float:
    import triton.testing as tt

    if graph:
        return float(tt.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(tt.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def baselines():
    """(name, FA3's flash_attn_varlen_func or None): FA3 serves prefill and paged decode."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        return "FA3 (vllm_flash_attn)", flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - vLLM absent on the bench machine
        return "torch SDPA (flash backend)", None


def speed_problem(T, ctx, D, H, page, params, block_q, seed=7, Hkv=None):
    """Llama-shaped problem built on the GPU (random cache, no reference): one request of T
    tokens (prompt T if ctx == 0, else prompt T - 1 plus a generated token), queries
    [ctx, T), H query heads, Hkv (default H) KV heads.  Same dict as ``build``."""
    torch.manual_seed(seed)
    n_blocks = -(-T // page)
    kw = dict(device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(n_blocks, page, Hkv or H, D, **kw)
    prompt = T if ctx == 0 else T - 1
    entries = [(0, s.q_start - ctx, s) for s in plan_request(prompt, ctx, T, params)]
    pre, dec = tm.split_prefill_decode(entries)
    return dict(
        query=torch.randn(T - ctx, H, D, **kw),
        key_cache=kc,
        value_cache=torch.randn_like(kc),
        block_table=torch.randperm(n_blocks, device=DEV).to(torch.int32)[None],
        pre=tm.build_segment_table(pre, params, block_q, DEV) if pre else None,
        dec=tm.build_segment_table(dec, params, 1, DEV) if dec else None,
        inv=rope_inv_freq(D, ROPE).to(DEV),
        scale=D**-0.5,
    )


def baseline_prefill(fa_varlen, T: int, H: int, D: int):
    """Causal attention of T tokens (bf16, H x D, pre-rotated): FA3 varlen or SDPA flash."""
    q = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    if fa_varlen is not None:
        cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
        return lambda: fa_varlen(
            q,
            k,
            v,
            max_seqlen_q=T,
            cu_seqlens_q=cu,
            max_seqlen_k=T,
            cu_seqlens_k=cu,
            causal=True,
            fa_version=3,
        )
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    return sdpa


def baseline_decode(fa_varlen, S: int, H: int, D: int):
    """One query token against S cached tokens (bf16): FA3 over a paged cache (block 16, as
    vLLM's FLASH_ATTN decodes) or SDPA on contiguous KV."""
    if fa_varlen is not None:
        q = torch.randn(1, H, D, device=DEV, dtype=torch.bfloat16)
        kc = torch.randn(-(-S // 16), 16, H, D, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        bt = torch.arange(kc.shape[0], device=DEV, dtype=torch.int32)[None]
        cu = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
        used = torch.tensor([S], dtype=torch.int32, device=DEV)
        return lambda: fa_varlen(
            q, kc, vc, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=S, seqused_k=used,
            causal=True, block_table=bt, fa_version=3,
        )  # fmt: skip
    q = torch.randn(1, 1, H, D, device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(1, S, H, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)


PREFILL_CONFIGS = [  # block_m, block_n, warps, stages, fast_trig, angle_add
    (128, 64, 8, 2, True, True), (128, 64, 8, 2, True, False), (128, 64, 8, 3, True, True),
    (128, 32, 8, 2, True, True), (256, 64, 16, 2, True, True), (64, 32, 4, 2, True, True),
    (128, 64, 8, 2, False, True),
]  # fmt: skip


class DecodeCfg(NamedTuple):
    """A decode launch config of the sweep (``mesa_decode`` keywords)."""

    block_n: int
    warps: int
    stages: int
    angle_add: bool = False
    turn_query: bool = True  # False: every key turned as loaded
    tile_rows: int = 16
    tail_first: bool = False  # a sequence's busy splits start last to first

    @property
    def launchable(self) -> bool:
        """The engine launches no angle addition and the query turned (mesa_vllm/envs.py)."""
        return self.turn_query and not self.angle_add


_D = DecodeCfg
DECODE_CONFIGS = [  # the first: mesa_decode's defaults
    _D(128, 4, 3, tail_first=True), _D(128, 4, 3), _D(128, 4, 2, tail_first=True),
    _D(128, 4, 3, turn_query=False), _D(64, 4, 3, tail_first=True), _D(64, 4, 3),
    _D(128, 8, 3, tail_first=True),
]  # fmt: skip
DECODE_SPLITS = (8, 16, 32, 64, 128)
SWEEP_MIN_SPLIT = 256  # the sweep's grid columns: a split reads at least this many keys


def _pre_kw(cfg) -> dict:
    bm, bn, w, st, fast, aa = cfg
    return dict(block_n=bn, num_warps=w, num_stages=st, fast_trig=fast, angle_add=aa)


def _dec_kw(cfg: DecodeCfg, sizing: tuple[int, int] | None = None) -> dict:
    """mesa_decode keywords (``DecodeTuning``'s and max_seq_len) of a decode config; sizing
    None: the grid's split count alone (the sweep: split_keys 0), else the engine's launch:
    per-sequence split sizing (split_keys, split_programs) in a grid for ENGINE_MAX_LEN."""
    keys, programs = sizing or (0, tm.DECODE_SPLIT_PROGRAMS)
    engine = dict(max_seq_len=ENGINE_MAX_LEN) if sizing else dict(min_split_keys=SWEEP_MIN_SPLIT)
    return dict(
        **engine,
        block_n=cfg.block_n,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
        angle_add=cfg.angle_add,
        turn_query=cfg.turn_query,
        tile_rows=cfg.tile_rows,
        split_keys=keys,
        split_programs=programs,
        tail_first=cfg.tail_first,
    )


ENGINE_MAX_LEN = 131072 + 64 + 8  # bench_gpu_e2e.py's speed engine: max_model_len
# candidate per-sequence split sizings (split_keys, split_programs): DECODE_SPLIT_KEYS and
# DECODE_SPLIT_PROGRAMS in mesa_vllm/ops/triton/table.py
SPLIT_SIZINGS = tuple(itertools.product((1024, 2048, 8192), (256, 512, 1024)))
DEFAULT_SIZING = (tm.DECODE_SPLIT_KEYS, tm.DECODE_SPLIT_PROGRAMS)


def _engine_split_args(sizing: tuple[int, int], Hkv: int, block_n: int) -> tuple:
    """(grid for ENGINE_MAX_LEN, min_split, split_div, split_keys) as ``mesa_decode`` derives
    them for one request with sizing (split_keys, split_programs)."""
    keys, programs = sizing
    grid = tm.decode_num_splits(ENGINE_MAX_LEN, 1, Hkv)
    return grid, *tm.decode_split_sizing(Hkv, block_n, tm.DECODE_MIN_SPLIT_KEYS, keys, programs)


def engine_splits(
    S: int, sizing: tuple[int, int], Hkv: int = SPEED_SHAPE[1], block_n: int = 128
) -> int:
    """Busy splits of one sequence of S keys in the engine (``split_len_host`` in
    mesa_vllm/ops/triton/table.py)."""
    per = tm.split_len_host(S, *_engine_split_args(sizing, Hkv, block_n), block_n)
    return int(-(-S // per))


def engine_grid(sizing: tuple[int, int], Hkv: int = SPEED_SHAPE[1], block_n: int = 128) -> int:
    """The grid's split count the engine launches: ``decode_busy_splits`` for ENGINE_MAX_LEN."""
    args = _engine_split_args(sizing, Hkv, block_n)
    return tm.decode_busy_splits(ENGINE_MAX_LEN, *args, block_n)


def pick_decode(sweep: list[dict]) -> tuple[DecodeCfg, tuple[int, int]]:
    """The decode config and split sizing the engine should launch: least sum over the swept
    lengths of the config's time at the engine's split count over the best time there."""
    at: dict = {}
    for r in sweep:
        cfg = DecodeCfg(*r["cfg"])
        if cfg.launchable:
            at.setdefault(r["S"], {})[(cfg, r["splits"])] = r["ms"]
    cands = {}  # (cfg, sizing) -> its time at each length
    for cfg in {c for d in at.values() for c, _ in d}:
        for sizing in SPLIT_SIZINGS:
            ms = {S: at[S].get((cfg, engine_splits(S, sizing, block_n=cfg.block_n))) for S in at}
            if ms and None not in ms.values():
                cands[(cfg, sizing)] = ms
    if not cands:
        return DECODE_CONFIGS[0], DEFAULT_SIZING
    best = {S: min(ms[S] for ms in cands.values()) for S in at}
    keys, programs = DEFAULT_SIZING

    def score(c):  # a tie (sizings giving the same split counts) goes to the default values
        return sum(m / best[S] for S, m in cands[c].items()), c[1][1] != programs, c[1][0] != keys

    return min(cands, key=score)


def decode_env(cfg: DecodeCfg, sizing: tuple[int, int]) -> str:
    """MESA_VLLM_DECODE_KERNEL value of a decode config (mesa_vllm/envs.py)."""
    if not cfg.launchable:
        raise ValueError(f"decode config {cfg}: the engine launches angle_add=False, turn_query")
    kw = _dec_kw(cfg, sizing)
    keys = ("block_n", "num_warps", "num_stages", "tile_rows", "split_keys", "split_programs",
            "tail_first")  # fmt: skip
    return ",".join(f"{k}={int(kw[k])}" for k in keys)


def sweep_prefill(T, params) -> list[dict]:
    """Prefill configs at T tokens (MHA shape); outputs compared with the first config's."""
    D, H, page = SPEED_SHAPE
    pb = speed_problem(T, 0, D, H, page, params, 128)
    out = torch.empty_like(pb["query"])
    fl, first, rows = mesa_flops(T, params, D, H), None, []
    entries = [(0, s.q_start, s) for s in plan_request(T, 0, T, params)]
    for cfg in PREFILL_CONFIGS:
        pbm = dict(pb, pre=tm.build_segment_table(entries, params, cfg[0], DEV))
        try:
            ms = bench_ms(lambda pbm=pbm, cfg=cfg: run(pbm, out=out, pre_kw=_pre_kw(cfg)))
        except Exception as e:  # noqa: BLE001 - report and go on
            log(f"sweep {cfg}: {type(e).__name__}: {e}")
            continue
        first = out.float().clone() if first is None else first
        diff = float((out.float() - first).abs().max())
        rows.append(dict(T=T, cfg=list(cfg), ms=ms, tflops=fl / ms / 1e9, max_diff=diff))
        log(f"sweep prefill {rows[-1]}")
    return rows


def sweep_decode(S, params) -> list[dict]:
    """Decode configs x split counts for one token at index S - 1 (MHA shape)."""
    D, H, page = SPEED_SHAPE
    pb = speed_problem(S, S - 1, D, H, page, params, 1, seed=11)
    out = torch.empty_like(pb["query"])
    rows, first = [], None
    for cfg in DECODE_CONFIGS:
        for sp in DECODE_SPLITS:
            try:
                ms = bench_ms(
                    lambda cfg=cfg, sp=sp: run(pb, sp, out=out, dec_kw=_dec_kw(cfg)), graph=True
                )
            except Exception as e:  # noqa: BLE001
                log(f"sweep decode {cfg} {sp}: {type(e).__name__}: {e}")
                continue
            first = out.float().clone() if first is None else first
            rows.append(
                dict(
                    S=S,
                    cfg=list(cfg),
                    splits=sp,
                    ms=ms,
                    max_diff=float((out.float() - first).abs().max()),
                )
            )
            log(f"sweep decode {rows[-1]}")
    return rows


def speed(args) -> dict:
    D, H, page = SPEED_SHAPE
    params = MesaParams(*LLAMA2.values())
    base_name, fa_varlen = baselines()
    res: dict = dict(baseline=base_name, prefill=[], decode=[], sweep=[], decode_sweep=[])
    lengths = [int(x) for x in args.lengths.split(",")]
    pre_cfg = (args.block_m, 64, 8, 2, True, True)
    dec_cfg, sizing = DECODE_CONFIGS[0], DEFAULT_SIZING
    if not args.skip_sweep:
        if args.sweep_len:
            res["sweep"] = sweep_prefill(args.sweep_len, params)
        if res["sweep"]:
            pre_cfg = tuple(min(res["sweep"], key=lambda r: r["ms"])["cfg"])
        torch.cuda.empty_cache()
        for S in map(int, str(args.decode_sweep_len).split(",")):
            res["decode_sweep"] += sweep_decode(S, params)
            torch.cuda.empty_cache()
        if res["decode_sweep"]:
            dec_cfg, sizing = pick_decode(res["decode_sweep"])
        torch.cuda.empty_cache()
    res["prefill_cfg"], res["decode_cfg"] = list(pre_cfg), list(dec_cfg)
    res["decode_split_keys"], res["decode_split_programs"] = sizing
    res["decode_env"] = decode_env(dec_cfg, sizing)
    log(f"DECODE_ENV {res['decode_env']}")
    if args.decode_env_out:
        with open(args.decode_env_out, "w") as f:
            f.write(res["decode_env"] + "\n")
    log(f"prefill config {pre_cfg}, decode config {dec_cfg}")
    for Hkv in (H, H // 4, H // 8):
        for T in lengths if Hkv == H else lengths[1:]:
            try:
                row = speed_prefill(T, Hkv, pre_cfg, params, fa_varlen if Hkv == H else None)
                res["prefill"].append(row)
            except Exception as e:  # noqa: BLE001
                log(f"prefill {T}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        for S in lengths if Hkv == H else lengths[1:]:
            try:
                base = fa_varlen if Hkv == H else None
                row = speed_decode(S, Hkv, dec_cfg, sizing, params, base)
                res["decode"].append(row)
            except Exception as e:  # noqa: BLE001
                log(f"decode {S}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
    return res


def speed_prefill(T, Hkv, cfg, params, fa_varlen) -> dict:
    """Mesa prefill of a whole T-token prompt; for MHA also the causal baseline."""
    D, H, page = SPEED_SHAPE
    pb = speed_problem(T, 0, D, H, page, params, max(1, cfg[0] // (H // Hkv)), Hkv=Hkv)
    pb["out"] = out = torch.empty_like(pb["query"])
    ms = bench_ms(lambda: run(pb, out=out, pre_kw=_pre_kw(cfg)))
    pb.clear()  # free the cache before the baseline allocates its q/k/v
    fl = mesa_flops(T, params, D, H)
    row = dict(T=T, Hkv=Hkv, mesa_ms=ms, mesa_tflops=fl / ms / 1e9, mesa_gflop=fl / 1e9)
    if Hkv == H:
        base_ms = bench_ms(baseline_prefill(fa_varlen, T, H, D))
        base_fl = 4.0 * D * H * T * (T + 1) / 2
        row.update(base_ms=base_ms, base_tflops=base_fl / base_ms / 1e9, base_gflop=base_fl / 1e9)
    log(f"prefill {row}")
    return row


def speed_decode(S, Hkv, cfg, sizing, params, fa_varlen) -> dict:
    """One decode token at index S - 1 (CUDA-graph replay): as the engine launches it (grid
    for ENGINE_MAX_LEN, per-sequence split sizing (split_keys, split_programs)), and the best
    grid split count of DECODE_SPLITS alone."""
    D, H, page = SPEED_SHAPE
    pb = speed_problem(S, S - 1, D, H, page, params, 1, seed=11, Hkv=Hkv)
    out = torch.empty_like(pb["query"])
    grid = tm.decode_num_splits(ENGINE_MAX_LEN, 1, Hkv)
    engine_kw = _dec_kw(cfg, sizing)
    engine_ms = bench_ms(lambda: run(pb, grid, out=out, dec_kw=engine_kw), graph=True)
    more_rows = {}  # GQA: the 16 rows hold 4 stair positions only; try wider tiles
    for rows_n in (32, 64) if Hkv < H else ():
        kw = dict(engine_kw, tile_rows=rows_n)
        more_rows[rows_n] = bench_ms(lambda kw=kw: run(pb, grid, out=out, dec_kw=kw), graph=True)
    rows = []
    for sp in sorted({tm.decode_num_splits(S, 1, Hkv), *DECODE_SPLITS}):
        fn = lambda sp=sp: run(pb, sp, out=out, dec_kw=_dec_kw(cfg))  # noqa: E731
        rows.append((bench_ms(fn, graph=True), sp))
    ms, splits = min(rows)
    pb.clear()
    gb = 2 * S * Hkv * D * 2 / 1e9
    row = dict(
        S=S,
        Hkv=Hkv,
        mesa_ms=engine_ms,
        engine_ms_tile_rows=more_rows,
        engine_splits=engine_splits(S, sizing, Hkv, block_n=cfg.block_n),
        engine_grid=engine_grid(sizing, Hkv, block_n=cfg.block_n),
        best_grid_ms=ms,
        splits=splits,
        all_splits={sp: m for m, sp in rows},
        mesa_tbs=gb / engine_ms,
    )
    if Hkv == H:
        base_ms = bench_ms(baseline_decode(fa_varlen, S, H, D), graph=True)
        row.update(base_ms=base_ms, base_tbs=gb / base_ms)
    log(f"decode {row}")
    return row


def markdown(check_rows, sp) -> str:
    lines = []
    if check_rows:
        lines += [
            "| check | seed | rows | NaN | max abs err | rel L2 | tol (abs, L2) | ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in check_rows:
            lines.append(
                f"| {r['name']} | {r['seed']} | {r.get('rows', '')} | {r['nan']} | "
                f"{r['max_abs']:.2e} | {r['rel_l2']:.2e} | {r['atol']:g}, {r['rtol']:g} "
                f"| {'yes' if r['ok'] else 'NO: ' + r.get('error', '')} |"
            )
        lines.append("")
    if not sp:
        return "\n".join(lines)
    if sp["sweep"]:
        lines += [
            f"Prefill configs at T = {sp['sweep'][0]['T']} "
            f"({SPEED_SHAPE[1]} x {SPEED_SHAPE[0]} MHA, bf16):",
            "",
            "| BLOCK_M/N, warps, stages, fast trig, angle add | ms | useful TFLOP/s | "
            "max diff vs first |",
            "|---|---|---|---|",
        ]
        for r in sp["sweep"]:
            lines.append(
                f"| {', '.join(map(str, r['cfg']))} | {r['ms']:.2f} | "
                f"{r['tflops']:.0f} | {r['max_diff']:.1e} |"
            )
        lines.append("")
    if sp["decode_sweep"]:
        lines += [
            f"Decode configs (ms, CUDA graph; a split reads at least {SWEEP_MIN_SPLIT} keys, "
            "idle splits return at once):",
            "",
            "| S | BLOCK_N, warps, stages, angle add, turn query, tile rows, tail first | "
            + " | ".join(f"{n} splits" for n in DECODE_SPLITS)
            + " |",
            "|---|---|" + "---|" * len(DECODE_SPLITS),
        ]
        by_cfg: dict = {}
        for r in sp["decode_sweep"]:
            by_cfg.setdefault((r["S"], tuple(r["cfg"])), {})[r["splits"]] = r["ms"]
        for (S, cfg), d in by_cfg.items():
            cells = " | ".join(f"{d[n]:.4f}" if n in d else "-" for n in DECODE_SPLITS)
            lines.append(f"| {S} | {', '.join(map(str, cfg))} | {cells} |")
        lines.append("")
    b = sp["baseline"]
    lines += [
        f"Prefill of a whole prompt, one layer, {SPEED_SHAPE[1]} query heads x {SPEED_SHAPE[0]}, "
        f"bf16, cache block {SPEED_SHAPE[2]}, config {sp['prefill_cfg']}.  Mesa rotates q/k "
        f"in-kernel; baseline {b}, causal over pre-rotated q/k (MHA rows only).",
        "",
        f"| T | KV heads | Mesa ms | Mesa useful TFLOP/s | Mesa GFLOP | {b} ms | "
        f"{b} TFLOP/s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sp["prefill"]:
        base = (
            (f"{r['base_ms']:.3f} | {r['base_tflops']:.0f} | {r['base_ms'] / r['mesa_ms']:.1f}x")
            if "base_ms" in r
            else "- | - | -"
        )
        lines.append(
            f"| {r['T']} | {r['Hkv']} | {r['mesa_ms']:.3f} | {r['mesa_tflops']:.0f} | "
            f"{r['mesa_gflop']:.0f} | {base} |"
        )
    lines += [
        "",
        f"Decode of one token, one layer-call (CUDA graph replay), config "
        f"{sp['decode_cfg']}, split_keys {sp.get('decode_split_keys')}, split_programs "
        f"{sp.get('decode_split_programs')}: as the engine launches "
        f"it (max_model_len {ENGINE_MAX_LEN}: the grid the sizing needs for that length, the "
        f"sequence's own split count), and the best grid split count alone; baseline {b} "
        f"({'paged cache, block 16' if b.startswith('FA3') else 'contiguous KV'}).",
        "",
        f"| S | KV heads | Mesa ms (engine) | busy / grid splits | Mesa KV TB/s | best grid ms | "
        f"grid splits | {b} ms | {b} KV TB/s | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sp["decode"]:
        base = "- | - | -"
        if "base_ms" in r:
            base = f"{r['base_ms']:.4f} | {r['base_tbs']:.2f} | {r['mesa_ms'] / r['base_ms']:.2f}"
        lines.append(
            f"| {r['S']} | {r['Hkv']} | {r['mesa_ms']:.4f} | {r.get('engine_splits', '-')} / "
            f"{r.get('engine_grid', '-')} | "
            f"{r['mesa_tbs']:.2f} | {r.get('best_grid_ms', r['mesa_ms']):.4f} | {r['splits']} | "
            f"{base} |"
        )
    wide = [r for r in sp["decode"] if r.get("engine_ms_tile_rows")]
    if wide:
        lines += ["", "GQA, engine launch with wider tiles (ms): tile_rows 16 / 32 / 64", ""]
        lines += ["| S | KV heads | 16 | 32 | 64 |", "|---|---|---|---|---|"]
        for r in wide:
            more = r["engine_ms_tile_rows"]
            cells = " | ".join(f"{more[n]:.4f}" if n in more else "-" for n in (32, 64))
            lines.append(f"| {r['S']} | {r['Hkv']} | {r['mesa_ms']:.4f} | {cells} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- weave-PE variants


def variant_params(pe, mesa, max_len, chunked=None, sink=4, log_n=None) -> MesaParams:
    """MesaParams of ``pe`` with the product's defaults (docs/VARIANTS.md, the rules of
    mesa_vllm.support, as MesaConfig.resolved applies them) for training length L = mesa[0]
    and a max-model-len ``max_len``; mesa = (L, F, Lc, Mmax, E)."""
    L = mesa[0]
    rule = PE_RULES[pe]
    chunked = bool(rule.chunked) if chunked is None else chunked
    log_n = rule.log_n if log_n is None else log_n
    if not rule.weave:
        return MesaParams(*mesa, log_n)
    w = rule.default_window(L, sink)
    k = default_leaky_factor(max_len, L, w) if pe == "leaky_rerope" else 1.0
    g = smallest_group_size(max_len, L, w) if pe == "self_extend" else 1
    s = sink if rule.windowed else 0
    return MesaParams(*mesa, log_n, pe, chunked, w, k, g, s)


VARIANT_CHECKS = [
    # name, pe, chunked, dtype, D, Hkv, G, page, (L, F, Lc, Mmax, E), requests, splits
    ("rerope bf16 D128 G1 p16 32L+short+decode", "rerope", False, torch.bfloat16, 128, 4, 1,
     16, (256, 16, 64, 32, 8), [(8192, 8192, 0), (200, 200, 0), (3000, 3100, 3099)], 8),
    ("rerope chunked bf16 D64 G8 p16", "rerope", True, torch.bfloat16, 64, 1, 8, 16,
     (256, 16, 64, 32, 8), [(4096, 4096, 0), (3000, 3100, 2900), (5000, 5001, 5000)], 16),
    ("leaky fp16 D64 G4 p32 chunked-from-mid+decode", "leaky_rerope", False, torch.float16,
     64, 2, 4, 32, (256, 16, 64, 32, 8),
     [(4096, 4096, 2048), (300, 300, 0), (200, 260, 259), (1000, 1040, 1039)], 8),
    ("leaky chunked bf16 D128 G4 p64 L512", "leaky_rerope", True, torch.bfloat16, 128, 2, 4,
     64, (512, 100, 128, 50, 16), [(6000, 6000, 0), (600, 700, 699), (400, 400, 0)], 16),
    ("self_extend bf16 D128 G8 p64 L512", "self_extend", False, torch.bfloat16, 128, 1, 8, 64,
     (512, 100, 128, 50, 16),
     [(2048, 2048, 0), (600, 700, 699), (5000, 5001, 5000), (512, 512, 0)], 16),
    ("self_extend chunked fp16 D64 G1 p32", "self_extend", True, torch.float16, 64, 8, 1, 32,
     (256, 16, 64, 32, 8), [(3000, 3000, 0), (513, 600, 513), (100, 1500, 1499)], 5),
    ("streaming bf16 D64 G1 p16 32L+gen", "streaming", False, torch.bfloat16, 64, 4, 1, 16,
     (256, 16, 64, 32, 8), [(8000, 8192, 0), (513, 600, 513), (100, 1500, 1499)], 32),
    ("lm_infinite fp16 D128 G4 p32", "lm_infinite", False, torch.float16, 128, 2, 4, 32,
     (256, 16, 64, 32, 8), [(6000, 6000, 0), (100, 100, 0), (2000, 2100, 2099)], 8),
    ("leaky fp32 D64 G4 p16", "leaky_rerope", False, torch.float32, 64, 2, 4, 16,
     (256, 16, 64, 32, 8), [(2000, 2000, 0), (700, 720, 719)], 4),
]  # fmt: skip
VARIANT_MAX_LEN = 32  # x L: the max-model-len the variant defaults are resolved for
SPEED_VARIANTS = [  # pe, chunked prefill: every rule, each way it allows
    (pe, chunked)
    for pe, rule in PE_RULES.items()
    for chunked in ((False, True) if rule.chunked is None else (rule.chunked,))
]


def variant_checks(seed: int) -> list[dict]:
    rows = []
    for i, (name, pe, chunked, dtype, D, Hkv, G, page, mesa, reqs, splits) in enumerate(
        VARIANT_CHECKS
    ):
        atol, rtol = TOL[dtype]
        params = variant_params(pe, mesa, VARIANT_MAX_LEN * mesa[0], chunked)
        try:
            r = one_check(name, dtype, D, Hkv, G, page, params, reqs, splits, seed + i)
        except Exception as e:  # noqa: BLE001 - report, keep going (device time is scarce)
            r = dict(name=name, seed=seed + i, nan=-1, max_abs=float("nan"),
                     rel_l2=float("nan"), atol=atol, rtol=rtol, ok=False,
                     error=f"{type(e).__name__}: {e}"[:500])  # fmt: skip
        r.update(
            pe=pe, chunked=chunked, window=params.window, k=round(params.leaky_factor, 3),
            group=params.group_size, sink=params.sink_tokens,
        )  # fmt: skip
        log(f"check {r}")
        rows.append(r)
    return rows


def visible_keys(T: int, params: MesaParams) -> int:
    """Keys attended, summed over the queries of a whole T-token prompt (plan segments)."""
    keys = 0
    for s in plan_request(T, 0, T, params, dynamic_split(T, params)):
        a, b = s.q_start, s.q_end
        if s.kind == "middle":
            lo, hi = params.first_chunk + a - s.chunk_start, params.first_chunk + b - s.chunk_start
            keys += (lo + 1 + hi) * (hi - lo) // 2
        elif s.kind == "weave" and params.windowed:
            W, S = params.window, params.sink_tokens
            keys += sum(min(p + 1, W) + min(S, max(0, p + 1 - W)) for p in range(a, b))
        else:
            keys += (a + 1 + b) * (b - a) // 2
    return keys


def variant_speed(lengths) -> list[dict]:
    """Prefill of a T-token prompt and decode at index T - 1, Llama-2-7B shape, per variant
    and T (T <= L: the causal path of each variant's kernel specialisation)."""
    D, H, page = SPEED_SHAPE
    mesa = tuple(LLAMA2.values())
    rows = []
    for (pe, chunked), T in itertools.product(SPEED_VARIANTS, lengths):
        if T <= LLAMA2["L"] and chunked and pe != "stair":
            continue  # same kernel and segments as the unchunked row
        params = variant_params(pe, mesa, max(lengths), chunked)
        name = pe + (" chunked" if chunked and pe != "stair" else "")
        try:
            pb = speed_problem(T, 0, D, H, page, params, 128)
            out = torch.empty_like(pb["query"])
            pre_ms = bench_ms(lambda pb=pb, o=out: run(pb, out=o))
            pb.clear()
            fl = 4.0 * D * H * visible_keys(T, params)
            pb = speed_problem(T, T - 1, D, H, page, params, 1, seed=11)
            out = torch.empty_like(pb["query"])
            splits = tm.decode_num_splits(T, 1, H)
            dec_ms = bench_ms(lambda pb=pb, o=out, n=splits: run(pb, n, out=o), graph=True)
            pb.clear()
            row = dict(variant=name, T=T, prefill_ms=pre_ms, prefill_tflops=fl / pre_ms / 1e9,
                       gflop=fl / 1e9, decode_ms=dec_ms, splits=splits, window=params.window,
                       k=round(params.leaky_factor, 3), group=params.group_size)  # fmt: skip
        except Exception as e:  # noqa: BLE001
            row = dict(variant=name, T=T, error=f"{type(e).__name__}: {e}"[:300])
        log(f"variant speed {row}")
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def variants_markdown(check_rows, speed_rows) -> str:
    lines = [
        "| check | pe | chunked | w / W | k | G | S | seed | rows | NaN | max abs err | rel L2 "
        "| tol (abs, L2) | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in check_rows:
        lines.append(
            f"| {r['name']} | {r['pe']} | {r['chunked']} | {r['window']} | {r['k']} | "
            f"{r['group']} | {r['sink']} | {r['seed']} | {r.get('rows', '')} | {r['nan']} | "
            f"{r['max_abs']:.2e} | {r['rel_l2']:.2e} | {r['atol']:g}, {r['rtol']:g} | "
            f"{'yes' if r['ok'] else 'NO: ' + r.get('error', '')} |"
        )
    if speed_rows:
        lines += [
            "",
            f"Speed per variant: one layer, {SPEED_SHAPE[1]} heads x {SPEED_SHAPE[0]} (MHA), bf16, "
            f"cache block {SPEED_SHAPE[2]}, L = {LLAMA2['L']}, defaults for max-model-len = "
            f"{max(r['T'] for r in speed_rows)}; T <= L rows run causal segments only (the "
            "speed of each kernel specialisation on plain attention); "
            "prefill of a whole T-token prompt (useful FLOPs: 4 D H x keys attended), decode of "
            "the token at T - 1 (CUDA-graph replay).",
            "",
            "| variant | T | w | k | G | prefill ms | useful TFLOP/s | GFLOP | decode ms "
            "| splits |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in speed_rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['T']} | error: {r['error']} |")
                continue
            lines.append(
                f"| {r['variant']} | {r['T']} | {r['window']} | {r['k']} | {r['group']} | "
                f"{r['prefill_ms']:.2f} | {r['prefill_tflops']:.0f} | {r['gflop']:.0f} | "
                f"{r['decode_ms']:.4f} | {r['splits']} |"
            )
    return "\n".join(lines)


def variants_main(args) -> None:
    t0 = time.time()
    check_rows = [] if args.skip_checks else variant_checks(args.seed)
    log(f"variant checks done in {time.time() - t0:.0f}s")
    lengths = [int(x) for x in args.variant_lengths.split(",")]
    speed_rows = [] if args.skip_speed else variant_speed(lengths)
    log(f"variants done in {time.time() - t0:.0f}s")
    table = variants_markdown(check_rows, speed_rows)
    log("\n" + table)
    finish("bench_variants", table, check_rows, speed_rows, args.seed)


def finish(stem: str, table: str, check_rows: list, speed, seed: int) -> None:
    """Write ``$OUT/<stem>.json`` and ``.md`` (when OUT is set); exit non-zero on a failed
    check."""
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        payload = dict(checks=check_rows, speed=speed, seed=seed)
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
        (out / f"{stem}.md").write_text(table + "\n")
    if check_rows and not all(r["ok"] for r in check_rows):
        sys.exit(f"{stem}: some checks failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--sweep-len", type=int, default=32768, help="prefill sweep T (0: none)")
    ap.add_argument("--decode-sweep-len", default="4096,32768,131072", help="comma list")
    ap.add_argument(
        "--decode-env-out", default="", help="file for the picked MESA_VLLM_DECODE_KERNEL value"
    )
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--variants", action="store_true", help="weave-PE variants instead")
    ap.add_argument("--variant-lengths", default="4096,32768", help="--variants speed: T")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "little"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.set_num_threads(os.cpu_count() or 1)
    import triton

    log(
        f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
        f"seed {args.seed}"
    )
    if args.variants:
        return variants_main(args)
    t0 = time.time()
    check_rows = [] if args.skip_checks else checks(args.seed)
    log(f"checks done in {time.time() - t0:.0f}s")
    sp = None if args.skip_speed else speed(args)
    table = markdown(check_rows, sp)
    log("\n" + table)
    finish("bench_kernels", table, check_rows, sp, args.seed)


if __name__ == "__main__":
    main()
