"""The real model on a GPU: Mesa equals stock FLASH_ATTN within the trained length.

    python benchmarks/real_model/gpu_check.py MODEL_DIR [--out DIR]

SmolLM2-135M-Instruct (L = 8192) in bf16 with CUDA graphs: chat prompts and passkey prompts
from 0.1x to 0.95x L.  Prompt logprobs must agree within LOGPROB_TOL (bf16; FLASH_ATTN and
Mesa's in-L prefill both run vLLM's FlashAttention).  Greedy tokens must be equal, or first
differ where FLASH_ATTN's top-2 logprobs at that step are within TIE_TOL (a bf16 near-tie:
decode runs Mesa's own kernel, whose sums round differently).  Then Mesa serves 2x and 4x L
prompts.
Prints one table, writes check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

LOGPROB_TOL = 0.05
TIE_TOL = 0.05
CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three fruits."]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mesa_vllm.eval.data import passkey_sample
    from mesa_vllm.testing.real_models import chat_prompt_ids

    L = json.loads((args.model / "config.json").read_text())["max_position_embeddings"]
    tok = AutoTokenizer.from_pretrained(str(args.model))
    prompts = [chat_prompt_ids(tok, c) for c in CHATS]
    for i, f in enumerate((0.1, 0.5, 0.95)):
        prompts.append(tok.encode(passkey_sample(tok, int(f * L), rng=random.Random(i)).prompt))
    sp = SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=0, logprobs=2)
    outs, secs = {}, {}
    for backend in ("FLASH_ATTN", "mesa"):
        t0 = time.time()
        llm = LLM(
            model=str(args.model), dtype="bfloat16", gpu_memory_utilization=0.15,
            kv_cache_memory_bytes=4 << 30,  # fixed: other servers may start beside it
            max_model_len=4 * L + 64 if backend == "mesa" else L, attention_backend=backend,
        )  # fmt: skip
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        outs[backend] = [
            (
                list(o.outputs[0].token_ids),
                [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)],
                [
                    sorted((x.logprob for x in d.values()), reverse=True)
                    for d in o.outputs[0].logprobs
                ],
            )
            for o, p in zip(res, prompts, strict=True)
        ]
        if backend == "mesa":
            rng = random.Random(0)
            long = [[1] + [rng.randrange(100, 49000) for _ in range(m * L)] for m in (2, 4)]
            lres = llm.generate(
                [{"prompt_token_ids": p} for p in long],
                SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0),
                use_tqdm=False,
            )
            outs["long_ok"] = all(len(o.outputs[0].token_ids) == 8 for o in lres)
        secs[backend] = round(time.time() - t0, 1)
        llm.llm_engine.engine_core.shutdown()
        del llm
    rows = []
    for p, a, b in zip(prompts, outs["FLASH_ATTN"], outs["mesa"], strict=True):
        dlp = max(abs(x - y) for x, y in zip(a[1], b[1], strict=True))
        first = next((i for i, (x, y) in enumerate(zip(a[0], b[0], strict=False)) if x != y), None)
        gap = None if first is None else a[2][first][0] - a[2][first][1]
        rows.append({
            "prompt_tokens": len(p), "greedy_equal": a[0] == b[0], "first_difference": first,
            "top2_gap_there": gap, "max_dlogprob": dlp,
            "ok": dlp <= LOGPROB_TOL and (first is None or gap <= TIE_TOL),
        })  # fmt: skip
    result = {
        "model": str(args.model),
        "rows": rows,
        "logprob_tolerance": LOGPROB_TOL,
        "tie_tolerance": TIE_TOL,
        "pass": all(r["ok"] for r in rows),
        "mesa_2x_4x_served": outs["long_ok"],
        "seconds": secs,
        "answer": tok.decode(outs["mesa"][0][0]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.json").write_text(json.dumps(result, indent=2))
    print("| prompt tokens | greedy equal | first difference (top-2 gap) | max |dlogprob| |")
    print("|---|---|---|---|")
    for r in rows:
        diff = (
            "-"
            if r["first_difference"] is None
            else (f"token {r['first_difference']} ({r['top2_gap_there']:.3f})")
        )
        print(f"| {r['prompt_tokens']} | {r['greedy_equal']} | {diff} | {r['max_dlogprob']:.2e} |")
    print(f"CHECK pass={result['pass']} long_served={outs['long_ok']} secs={secs}")
    print(f"CHECK answer to {CHATS[0]!r}: {result['answer']!r}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
