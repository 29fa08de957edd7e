"""Every weave-PE variant (docs/VARIANTS.md) and Stair PE served by vLLM on the GPU (Triton
kernels, fp32) against the dense whole-model oracle (tests/oracle.py with the independent
references): the same exactness check the CPU suite runs (tests/e2e/test_variants.py).

    python benchmarks/gpu_variants.py [--out DIR]

Random-weight Llama, L = 64; prompts of 40 tokens, 5x, 13x and 30x L; prefill in 160-token
steps.  Pass: max |prompt logprob - oracle| <= 2e-3 and 6 greedy tokens of the 5x prompt equal
the oracle's.  Prints one table row per variant; writes gpu_variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
ATOL = 2e-3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    from oracle import dense_greedy, prompt_logprob_error
    from vllm import LLM, SamplingParams

    from mesa_vllm.testing.cases import MESA_SMALL, TRAIN_LEN, VARIANT_CASES
    from mesa_vllm.testing.tiny_models import make_random_model

    model = make_random_model("llama", Path("/tmp/gpu-variants/llama"), train_len=TRAIN_LEN)
    rng = random.Random(args.seed)
    lengths = (40, 5 * TRAIN_LEN + 3, 13 * TRAIN_LEN + 11, 30 * TRAIN_LEN + 5)
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n - 1)] for n in lengths]
    sp = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, ignore_eos=True)
    cases = {"stair": {}, **VARIANT_CASES}
    rows, results = [], {"seed": args.seed, "device": torch.cuda.get_device_name(0)}
    for name, fields in cases.items():
        mesa = {**MESA_SMALL, **fields}
        t0 = time.time()
        llm = LLM(
            model=str(model),
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            gpu_memory_utilization=0.2,
            attention_backend="mesa",
            additional_config={"mesa": mesa},
            block_size=16,
            max_num_batched_tokens=160,
        )
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        errs = [
            prompt_logprob_error(model, p, o.prompt_logprobs, mesa)
            for p, o in zip(prompts, outs, strict=True)
        ]
        greedy = list(outs[1].outputs[0].token_ids) == dense_greedy(model, prompts[1], 6, mesa=mesa)
        ok = max(errs) <= ATOL and greedy
        results[name] = {"max_abs_dlogprob": errs, "greedy_equal": greedy, "pass": ok}
        rows.append(
            f"| {name} | {' / '.join(f'{e:.1e}' for e in errs)} | {greedy} | "
            f"{'PASS' if ok else 'FAIL'} | {time.time() - t0:.0f} s |"
        )
        print(rows[-1], flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
    head = (
        f"| variant | max abs dlogprob at {' / '.join(map(str, lengths))} tokens | greedy equal "
        "| result | time |\n|---|---|---|---|---|"
    )
    print(head + "\n" + "\n".join(rows))
    (args.out / "gpu_variants.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["pass"] for k, r in results.items() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
