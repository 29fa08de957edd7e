"""Smallest GPU check of the Mesa backend inside vLLM: one tiny engine, short + long prompts."""

import random
import sys
from pathlib import Path


def main() -> int:
    from vllm import LLM, SamplingParams

    from mesa_vllm.testing.tiny_models import make_random_model

    model = make_random_model(
        "llama",
        Path("/tmp/smoke-llama"),
        train_len=256,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    llm = LLM(
        model=str(model),
        dtype="bfloat16",
        max_model_len=8192,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        attention_backend="mesa",
        additional_config={
            "mesa": {"first_chunk": 32, "last_chunk": 64, "max_remainder": 32, "stair_width": 64}
        },
    )
    rng = random.Random(0)
    prompts = [[0] + [rng.randrange(3, 450) for _ in range(n)] for n in (7, 200, 1000, 8000)]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=16),
        use_tqdm=False,
    )
    for p, o in zip(prompts, outs, strict=True):
        print("SMOKE", len(p), o.outputs[0].token_ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
