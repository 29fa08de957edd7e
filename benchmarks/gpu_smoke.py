"""Smallest GPU check of the Mesa backend inside vLLM: one tiny engine, short + long prompts,
run eager and with CUDA graphs (FULL graphs for single-token decode batches, piecewise
otherwise); the greedy tokens of the two modes must be equal.

    python benchmarks/gpu_smoke.py
"""

import random
import sys
from pathlib import Path


def run(model: Path, prompts: list[list[int]], eager: bool) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        dtype="float32",  # eager vs compiled: fp32 keeps near-tie flips out
        max_model_len=8192,
        enforce_eager=eager,
        gpu_memory_utilization=0.3,
        max_num_seqs=8,
        attention_backend="mesa",
        additional_config={
            "mesa": {"first_chunk": 32, "last_chunk": 64, "max_remainder": 32, "stair_width": 64}
        },
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        use_tqdm=False,
    )
    llm.llm_engine.engine_core.shutdown()
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    from mesa_vllm.testing.tiny_models import make_random_model

    model = make_random_model(
        "llama",
        Path("/tmp/smoke-llama"),
        train_len=256,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    rng = random.Random(0)
    # 5 requests: decode batches of 5..1 requests, padded to the captured sizes
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n)] for n in (7, 200, 1000, 3000, 8000)]
    eager = run(model, prompts, eager=True)
    graphs = run(model, prompts, eager=False)
    for p, a, b in zip(prompts, eager, graphs, strict=True):
        print("SMOKE", len(p), "eager", a[:12], "graphs==eager" if a == b else f"graphs {b[:12]}")
    same = eager == graphs
    print("SMOKE graphs == eager:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
