"""Tensor parallel 2 with the Mesa backend: same greedy output as one GPU, and throughput.

    python benchmarks/gpu_tp2.py [--out DIR]          (needs 2 GPUs; nvidia-h200-x2)

The bundled trained passkey model (8 query / 4 KV heads: 4 / 2 per rank) serves passkey
prompts from 1x to 32x its training length on TP=1 and TP=2 (each engine in its own
process, fp32, Triton path); greedy token ids must be equal.  Throughput: a batch of 32
prompts of 8x L with 64 generated tokens each, output tokens/s and total tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "mesa_vllm" / "assets" / "models" / "passkey-llama"
MULTIPLES = (1, 4, 16, 32)


def one(tp: int, out: Path) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mesa_vllm.eval.data import passkey_sample, score
    from mesa_vllm.testing.cases import PASSKEY_MODEL_MESA

    L = json.loads((MODEL / "config.json").read_text())["max_position_embeddings"]
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    llm = LLM(
        model=str(MODEL),
        dtype="float32",
        tensor_parallel_size=tp,
        max_model_len=max(MULTIPLES) * L + 128,
        enforce_eager=True,
        gpu_memory_utilization=0.4,
        attention_backend="mesa",
        additional_config={"mesa": {**PASSKEY_MODEL_MESA, "train_len": L}},
    )
    res: dict = {"tp": tp, "tokens": {}, "accuracy": {}}
    sp = SamplingParams(temperature=0, max_tokens=8)
    for m in MULTIPLES:
        batch = [passkey_sample(tok, m * L, rng=random.Random(100 * m + i)) for i in range(8)]
        outs = llm.generate([s.prompt for s in batch], sp, use_tqdm=False)
        res["tokens"][m] = [list(o.outputs[0].token_ids) for o in outs]
        res["accuracy"][m] = sum(
            score(o.outputs[0].text, s.answer) for o, s in zip(outs, batch, strict=True)
        ) / len(batch)
    rng = random.Random(7)
    prompts = [
        {"prompt_token_ids": [rng.randrange(3, 450) for _ in range(8 * L)]} for _ in range(32)
    ]
    gen = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(prompts[:2], gen, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate(prompts, gen, use_tqdm=False)
    dt = time.perf_counter() - t
    res["throughput"] = {
        "batch": 32,
        "prompt_tokens": 8 * L,
        "output_tokens": 64,
        "seconds": dt,
        "output_tok_per_s": 32 * 64 / dt,
        "total_tok_per_s": 32 * (8 * L + 64) / dt,
    }
    (out / f"tp{tp}.json").write_text(json.dumps(res, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        one(args.one, args.out)
        return 0
    runs = {}
    for tp in (1, 2):
        rc = subprocess.run(
            [sys.executable, __file__, "--one", str(tp), "--out", str(args.out)], timeout=270
        ).returncode
        path = args.out / f"tp{tp}.json"
        runs[tp] = json.loads(path.read_text()) if path.exists() else {"failed": rc}
    if any("failed" in r for r in runs.values()):
        print("TP2 FAILED", {tp: r.get("failed") for tp, r in runs.items()})
        return 1
    same = {m: runs[1]["tokens"][m] == runs[2]["tokens"][m] for m in runs[1]["tokens"]}
    print("| length | greedy TP2 == TP1 | passkey TP1 | passkey TP2 |")
    print("|---|---|---|---|")
    for m, eq in same.items():
        print(f"| {m}x L | {eq} | {runs[1]['accuracy'][m]:.2f} | {runs[2]['accuracy'][m]:.2f} |")
    for tp in (1, 2):
        t = runs[tp]["throughput"]
        print(
            f"TP={tp}: {t['batch']} x ({t['prompt_tokens']} + {t['output_tokens']}) tokens in "
            f"{t['seconds']:.2f} s: {t['output_tok_per_s']:.0f} output tok/s, "
            f"{t['total_tok_per_s']:.0f} total tok/s"
        )
    (args.out / "tp2.json").write_text(json.dumps({"same": same, "runs": runs}, indent=1))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
