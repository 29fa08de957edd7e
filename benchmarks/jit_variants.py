"""How many variants of each Mesa Triton kernel a serving engine compiles, on a CUDA GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/jit_variants.py [--steps 40] [--seed N]

Triton compiles a kernel once per *specialisation* of its arguments: each int argument
equal to 1 or divisible by 16, each pointer 16-byte aligned or not, each constexpr value.
A serving step's batch is any mix of prefill and decode requests, so an argument that
follows the batch compiles a new variant in the middle of serving, while requests wait
(vLLM logs it as "Triton kernel JIT compilation during inference").  This script launches
``mesa_prefill`` and ``mesa_decode`` the way the engine's mixed steps do (a segment table
per step, the decode grid from ``decode_num_splits`` of the step's longest sequence, a
persistent block table of fixed width) over ``--steps`` random batches of the real model's
shape (SmolLM2-135M: 3 KV heads, 9 query heads, head 64, bf16, L = 8192, blocks of 16):
1..64 requests, prompts up to 8 L, decode contexts up to 8 L.  It prints, per kernel, the
variants compiled after the first step and after all of them, twice: for the kernels as
shipped and for the same kernel functions re-wrapped by a plain ``triton.jit`` (Triton's
default specialisation), which is what they compiled before the batch-dependent arguments
were excluded.  Writes $OUT/jit_variants.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesa_vllm.ops.triton import decode, prefill  # noqa: E402
from mesa_vllm.ops.triton import table as tm  # noqa: E402
from mesa_vllm.plan import MesaParams, plan_request  # noqa: E402
from mesa_vllm.testing.reference import rope_inv_freq  # noqa: E402

KERNELS = {"prefill": (prefill, "_prefill_kernel"), "decode": (decode, "_decode_kernel"),
           "reduce": (decode, "_decode_reduce_kernel")}  # fmt: skip
SHAPE = dict(Hkv=3, G=3, D=64, page=16)  # SmolLM2-135M-Instruct
TRAIN_LEN = 8192
MAX_BLOCKS = 4096  # block-table width: max_model_len 65536 / 16, as the engine's table


def variants() -> dict[str, int]:
    dev = torch.cuda.current_device()
    return {name: len(getattr(mod, fn).device_caches[dev][0]) for name, (mod, fn) in
            KERNELS.items()}  # fmt: skip


def random_step(rng: random.Random) -> list[tuple[int, int, int]]:
    """Requests (T_prompt, seq_len, ctx) of one mixed step: decodes and prompt chunks."""
    reqs = []
    for _ in range(rng.randint(1, 64)):
        if rng.random() < 0.8:  # a decode: one query after a prompt of up to 8 L
            T = rng.randint(16, 8 * TRAIN_LEN)
            S = T + rng.randint(1, 256)
            reqs.append((T, S, S - 1))
        elif len([r for r in reqs if r[1] - r[2] > 1]) < 2:  # a prompt chunk (<= 2 a step)
            T = rng.randint(100, 8 * TRAIN_LEN)
            ctx = rng.choice([0, rng.randint(0, T - 1)])
            reqs.append((T, T, ctx if T - ctx <= 4096 else T - 4096))
    return reqs


def launch(reqs, params: MesaParams, cache: tuple) -> None:
    """One step's kernels.  The values are arbitrary (only the launches count): every
    request's block table points into one small random cache."""
    s = SHAPE
    kc, vc, inv = cache
    n_q = sum(S - ctx for _, S, ctx in reqs)
    q = torch.randn(n_q, s["Hkv"] * s["G"], s["D"], device="cuda", dtype=torch.bfloat16)
    bt = torch.randint(0, kc.shape[0], (len(reqs), MAX_BLOCKS), dtype=torch.int32,
                       device="cuda")  # fmt: skip
    entries, q_off = [], 0
    for r, (T, S, ctx) in enumerate(reqs):
        entries += [(r, q_off + g.q_start - ctx, g) for g in plan_request(T, ctx, S, params)]
        q_off += S - ctx
    out = torch.empty_like(q)
    pre, dec = tm.split_prefill_decode(entries)
    if pre:
        table = tm.build_segment_table(pre, params, tm.default_block_q(s["G"]), "cuda")
        prefill.mesa_prefill(q, kc, vc, bt, table, inv, s["D"] ** -0.5, out)
    if dec:
        max_seq = max(S for _, S, _ in reqs)
        table = tm.build_segment_table(dec, params, 1, "cuda")
        splits = tm.decode_num_splits(max_seq, len(dec), s["Hkv"])
        decode.mesa_decode(q, kc, vc, bt, table, inv, s["D"] ** -0.5, out, splits,
                           max_seq_len=max_seq)  # fmt: skip
    torch.cuda.synchronize()


def count(steps: list, params: MesaParams, label: str) -> dict:
    s = SHAPE
    cache = [torch.randn(256, s["page"], s["Hkv"], s["D"], device="cuda",
                         dtype=torch.bfloat16) for _ in range(2)]  # fmt: skip
    cache.append(rope_inv_freq(s["D"], {"rope_type": "default", "rope_theta": 1e5}).cuda())
    t0 = time.time()
    launch(steps[0], params, cache)
    first = variants()
    for i, reqs in enumerate(steps[1:], 1):
        launch(reqs, params, cache)
        if i % 10 == 0:
            print(f"[{label}] step {i}/{len(steps) - 1}: {variants()} "
                  f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    return dict(label=label, after_first_step=first, after_all=variants(),
                seconds=round(time.time() - t0, 1))  # fmt: skip


def plain_jit() -> None:
    """Re-wrap each kernel's Python function by a plain ``triton.jit`` (the launchers look the
    kernels up by module attribute at each call)."""
    import triton

    for mod, fn in KERNELS.values():
        setattr(mod, fn, triton.jit(getattr(mod, fn).fn))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "little"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("jit_variants.py needs a CUDA GPU")
    import triton

    rng = random.Random(args.seed)
    steps = [random_step(rng) for _ in range(args.steps)]
    params = MesaParams(train_len=TRAIN_LEN)
    print(f"{torch.cuda.get_device_name()} triton {triton.__version__} seed {args.seed}, "
          f"{args.steps} steps, {sum(map(len, steps))} requests", flush=True)  # fmt: skip
    rows = [count(steps, params, "shipped")]
    plain_jit()
    rows.append(count(steps, params, "plain triton.jit"))
    lines = ["| kernels | " + " | ".join(f"{k}: first step / all" for k in KERNELS) + " |",
             "|---|" + "---|" * len(KERNELS)]  # fmt: skip
    for r in rows:
        cells = [f"{r['after_first_step'][k]} / {r['after_all'][k]}" for k in KERNELS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "jit_variants.json").write_text(
            json.dumps(dict(seed=args.seed, steps=args.steps, rows=rows, table=lines), indent=1)
        )


if __name__ == "__main__":
    main()
