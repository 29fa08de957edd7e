"""Mesa decode per layer at batch 1..64 against FA3, on a CUDA GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_decode_batch.py [--batches 1,8,32,64]
        [--lengths 4096,32768] [--shapes 7b,smollm2] [--tunings "min_split_keys=128;..."]
        [--kv-dtype fp8]

One decode step of B sequences, each S tokens long (its query at index S - 1), timed as
CUDA-graph replays (``bench_kernels.bench_ms``): ``mesa_decode`` launched as the engine
launches a pure-decode step (the grid from ``decode_num_splits(max_model_len, B, Hkv)``,
max_seq_len = max_model_len, the default ``DecodeTuning``), and FA3's paged decode
(``vllm.vllm_flash_attn.flash_attn_varlen_func``, fa_version 3, one query per sequence, the
same paged cache of 16-token blocks: keys as stored; for speed only).  ``--tunings``: launch
options to time next to the default, ';'-separated, each in MESA_VLLM_DECODE_KERNEL's syntax
(mesa_vllm/envs.py); one more column each.  Shapes: ``7b`` =
Llama-2-7B (32 heads x 128, MHA, L = 4096), ``smollm2`` = SmolLM2-135M (9 query / 3 KV
heads x 64, L = 8192); bf16.  ``--kv-dtype fp8``: Mesa also reads the same cache stored as
fp8 e4m3 (scales 1), one more column "Mesa fp8 / baseline" and one per tuning ("fp8 <tuning>",
e.g. ``--tunings fp8_f16_dot=0``: bf16 dots), and FA3 reads it as vLLM's FLASH_ATTN does with an fp8
cache (the query cast to fp8 e4m3, descales 1): column "FA3 fp8" (the baseline stays FA3 over
the bf16 cache).  Prints one Markdown table; writes $OUT/decode_batch.json and .md when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_kernels import ENGINE_MAX_LEN, ROPE, baselines, bench_ms, log  # noqa: E402

from mesa_vllm.envs import decode_kernel_options  # noqa: E402
from mesa_vllm.ops.triton import table as tm  # noqa: E402
from mesa_vllm.ops.triton.decode import mesa_decode  # noqa: E402
from mesa_vllm.plan import MesaParams, plan_request  # noqa: E402
from mesa_vllm.testing.reference import rope_inv_freq  # noqa: E402

SHAPES = {  # name: (head size, query heads, KV heads, trained length)
    "7b": (128, 32, 32, 4096),
    "smollm2": (64, 9, 3, 8192),
}
PAGE = 16


def problem(B: int, S: int, shape: str) -> dict:
    """B sequences of S tokens in one shuffled paged cache; one query each (index S - 1)."""
    D, Hq, Hkv, L = SHAPES[shape]
    params = MesaParams(train_len=L)
    nblk = -(-S // PAGE)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(B * nblk, PAGE, Hkv, D, **kw)
    bt = torch.randperm(B * nblk, device="cuda").to(torch.int32).view(B, nblk)
    entries = [(r, r, seg) for r in range(B) for seg in plan_request(S - 1, S - 1, S, params)]
    _, dec = tm.split_prefill_decode(entries)
    return dict(
        q=torch.randn(B, Hq, D, **kw),
        kc=kc,
        vc=torch.randn_like(kc),
        bt=bt,
        table=tm.build_segment_table(dec, params, 1, "cuda"),
        inv=rope_inv_freq(D, ROPE).cuda(),
        scale=D**-0.5,
        Hkv=Hkv,
    )


def mesa_ms(pb: dict, B: int, tuning: tm.DecodeTuning | None = None, fp8: bool = False) -> float:
    """One Mesa decode step; ``fp8``: over the cache stored as fp8 e4m3 with scales 1."""
    out = torch.empty_like(pb["q"])
    grid = tm.decode_num_splits(ENGINE_MAX_LEN, B, pb["Hkv"])
    kc, vc, scales = pb["kc"], pb["vc"], None
    if fp8:
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        one = torch.ones(1, dtype=torch.float32, device="cuda")
        scales = (one, one.clone())
    args = (pb["q"], kc, vc, pb["bt"], pb["table"], pb["inv"], pb["scale"], out)
    fn = lambda: mesa_decode(*args, grid, max_seq_len=ENGINE_MAX_LEN, tuning=tuning,  # noqa: E731
                             kv_scales=scales)  # fmt: skip
    return bench_ms(fn, graph=True)


def fa3_ms(fa_varlen, pb: dict, B: int, S: int, fp8: bool = False) -> float | None:
    """FA3's paged decode step; ``fp8``: query and cache cast to fp8 e4m3, descales 1
    ([B, Hkv], as vLLM's FLASH_ATTN backend passes them)."""
    if fa_varlen is None:
        return None
    cu = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    used = torch.full((B,), S, dtype=torch.int32, device="cuda")
    q, kc, vc, extra = pb["q"], pb["kc"], pb["vc"], {}
    if fp8:
        q, kc, vc = (x.to(torch.float8_e4m3fn) for x in (q, kc, vc))
        one = torch.ones(1, 1, dtype=torch.float32, device="cuda").expand(B, pb["Hkv"])
        extra = dict(q_descale=one, k_descale=one, v_descale=one)
    fn = lambda: fa_varlen(  # noqa: E731
        q, kc, vc, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=S,
        seqused_k=used, causal=True, block_table=pb["bt"], fa_version=3, **extra,
    )  # fmt: skip
    return bench_ms(fn, graph=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--lengths", default="4096,32768")
    ap.add_argument("--shapes", default="7b,smollm2")
    ap.add_argument("--tunings", default="", help="';'-separated MESA_VLLM_DECODE_KERNEL values")
    ap.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                    help="fp8: also time Mesa over the cache stored as fp8 e4m3")  # fmt: skip
    args = ap.parse_args()
    fp8 = args.kv_dtype == "fp8"
    tunings = {t.strip(): tm.DecodeTuning(**decode_kernel_options(t))
               for t in args.tunings.split(";") if t.strip()}  # fmt: skip
    if not torch.cuda.is_available():
        sys.exit("bench_decode_batch.py needs a CUDA GPU")
    base_name, fa_varlen = baselines()
    log(f"{torch.cuda.get_device_name()}, baseline {base_name}")
    rows = []
    for shape in args.shapes.split(","):
        for S in map(int, args.lengths.split(",")):
            for B in map(int, args.batches.split(",")):
                try:
                    pb = problem(B, S, shape)
                    row = dict(shape=shape, S=S, B=B, mesa_ms=mesa_ms(pb, B),
                               base_ms=fa3_ms(fa_varlen, pb, B, S))  # fmt: skip
                    row["tunings"] = {k: mesa_ms(pb, B, t) for k, t in tunings.items()}
                    if fp8:
                        row["tunings"]["Mesa fp8"] = mesa_ms(pb, B, fp8=True)
                        for k, t in tunings.items():
                            row["tunings"][f"fp8 {k}"] = mesa_ms(pb, B, t, fp8=True)
                        try:
                            row["tunings"]["FA3 fp8"] = fa3_ms(fa_varlen, pb, B, S, fp8=True)
                        except Exception as e:  # noqa: BLE001 - FA3 without fp8: report
                            row["fa3_fp8_error"] = f"{type(e).__name__}: {e}"[:200]
                except Exception as e:  # noqa: BLE001 - report and go on (e.g. memory)
                    row = dict(shape=shape, S=S, B=B, error=f"{type(e).__name__}: {e}"[:200])
                pb = None
                torch.cuda.empty_cache()
                rows.append(row)
                log(f"decode batch {row}")
    columns = [*tunings]
    if fp8:
        columns += ["Mesa fp8", *(f"fp8 {k}" for k in tunings), "FA3 fp8"]
    lines = [f"One decode step per layer, bf16, CUDA-graph replay; baseline {base_name}.", "",
             "| shape | context | batch | Mesa ms | baseline ms | Mesa / baseline |"
             + "".join(f" {k} / baseline |" for k in columns),
             "|---|---|---|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['S']} | {r['B']} | {r['error']} | | |")
            continue
        base = r["base_ms"]
        ratio = f"{r['mesa_ms'] / base:.2f}x" if base else "-"
        values = [r["tunings"].get(k) for k in columns]
        extra = "".join(" - |" if v is None else f" {v / base:.2f}x |" if base else
                        f" {v:.4f} ms |" for v in values)  # fmt: skip
        lines.append(f"| {r['shape']} | {r['S']} | {r['B']} | {r['mesa_ms']:.4f} | "
                     f"{base if base is None else f'{base:.4f}'} | {ratio} |{extra}")  # fmt: skip
    table = "\n".join(lines)
    log("\n" + table)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        (out / "decode_batch.json").write_text(json.dumps(rows, indent=1))
        (out / "decode_batch.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
