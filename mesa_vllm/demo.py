"""``mesa-vllm demo``: serve the bundled model with the Mesa backend and ask it a passkey
question several times longer than its training length, through the OpenAI client.

Uses the bundled trained passkey model (``mesa_vllm/assets/models/passkey-llama``); if that is
absent, a seeded random-weight Llama is generated (its answer is then noise: the demo shows the
server path, not retrieval).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from mesa_vllm.eval.data import passkey_sample, score

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "models" / "passkey-llama"
RANDOM_MODEL = Path.home() / ".cache" / "mesa_vllm" / "random-llama-256"
# Mesa settings for the bundled 256-token model: see the model card and README.
DEMO_MESA = {"first_chunk": 32, "last_chunk": 64, "max_remainder": 32, "stair_width": 64}


def pick_model() -> tuple[Path, bool]:
    if (BUNDLED_MODEL / "model.safetensors").exists():
        return BUNDLED_MODEL, True
    from mesa_vllm.testing.tiny_models import make_random_model

    return make_random_model("llama", RANDOM_MODEL, train_len=256), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesa-vllm demo", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="model directory")
    parser.add_argument("--multiple", type=int, default=8, help="prompt length / train length")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path, default=Path("mesa-demo-server.log"))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from mesa_vllm.eval.methods import is_cpu_install, platform_defaults
    from mesa_vllm.eval.server import LocalServer, ServerError

    model, trained = (args.model, True) if args.model else pick_model()
    config = json.loads((model / "config.json").read_text())
    train_len = int(config["max_position_embeddings"])
    tok = AutoTokenizer.from_pretrained(str(model))
    sample = passkey_sample(tok, args.multiple * train_len, rng=random.Random(args.seed))
    if not trained:
        print("note: no trained model bundled; using a random-weight Llama (answer is noise)")
    mesa = {"mesa": {**DEMO_MESA, "train_len": train_len}}
    defaults = platform_defaults(is_cpu_install())
    server_args = [
        "--attention-backend",
        "mesa",
        "--additional-config",
        json.dumps(mesa),
        "--max-model-len",
        str(args.max_model_len),
        *defaults.args,
    ]
    print(f"model: {model} (trained length {train_len} tokens)")
    print(f"starting vLLM with --attention-backend mesa, max-model-len {args.max_model_len} ...")
    t0 = time.time()
    try:
        with LocalServer(
            str(model), server_args, env=defaults.env, log_path=args.log, served_name="mesa-demo"
        ) as srv:
            print(f"server ready in {time.time() - t0:.0f} s at {srv.base_url}")
            from openai import OpenAI

            client = OpenAI(base_url=srv.base_url, api_key="EMPTY")
            t1 = time.time()
            resp = client.completions.create(
                model="mesa-demo", prompt=sample.prompt, max_tokens=8, temperature=0
            )
            answer = resp.choices[0].text
            n_prompt = resp.usage.prompt_tokens
            print(
                f"prompt: {n_prompt} tokens = {n_prompt / train_len:.1f}x the training length "
                f"(key {sample.answer} at depth {sample.depth:.2f})"
            )
            print(f"answer: {answer!r}  ({time.time() - t1:.1f} s)")
            ok = score(answer, sample.answer)
            print(f"passkey {'FOUND' if ok else 'missed'}")
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
