"""``mesa-vllm eval passkey|needle|ppl``: compare extrapolation methods in one invocation.

Either evaluate a running OpenAI-compatible endpoint as one method::

    mesa-vllm eval passkey --base-url http://127.0.0.1:8000 --method-name mesa \\
        --tokenizer MODEL_DIR --train-len 256 --multiples 1,2,4,8

or start a local vLLM server per method in turn (always stopped afterwards)::

    mesa-vllm eval passkey --serve MODEL_DIR --methods stock-raised,mesa,dynamic-ntk,yarn \\
        --multiples 1,2,4,8,16,32 --samples 20 --mesa-config '{"first_chunk": 32}' --out out/

Writes ``results.json``, ``table.md`` and PNG plots to ``--out``; prints the table.
Exit codes: 0 all methods evaluated; 2 bad arguments, endpoint unreachable or a server that
did not start (results of the other methods are still written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mesa_vllm.eval import harness, methods, report


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not vals or min(vals) < 0 or max(vals) > 1:
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return vals


def _json_obj(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesa-vllm eval", description="Long-context evaluation: passkey, needle, perplexity."
    )
    p.add_argument("task", choices=harness.TASKS)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="existing OpenAI-compatible endpoint (one method)")
    where.add_argument("--serve", metavar="MODEL_DIR", help="start a local vLLM per method")
    p.add_argument("--model", help="model id at --base-url (default: the first served)")
    p.add_argument("--method-name", default="endpoint", help="name of the --base-url method")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument(
        "--methods",
        default="stock,mesa",
        help=f"with --serve, comma-separated of: {', '.join(methods.METHODS)}",
    )
    p.add_argument("--train-len", type=int, help="trained length L (default: model config)")
    p.add_argument(
        "--mesa-config",
        type=_json_obj,
        default={},
        help="JSON for the mesa method, e.g. '{\"first_chunk\": 32}'",
    )
    lens = p.add_mutually_exclusive_group()
    lens.add_argument("--lengths", type=_ints, help="prompt lengths in tokens, e.g. 256,512")
    lens.add_argument("--multiples", type=_ints, help="lengths as multiples of --train-len")
    p.add_argument("--samples", type=int, default=20, help="samples per length (and depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--depths",
        type=_floats,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="needle depths in [0, 1]",
    )
    p.add_argument("--max-tokens", type=int, default=harness.ANSWER_TOKENS)
    p.add_argument(
        "--ppl-tail",
        type=int,
        default=None,
        help="perplexity over the last N tokens of each text (default: last 25%%)",
    )
    p.add_argument("--tokenizer", help="tokenizer dir/name (default: --serve dir or --model)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-model-len", type=int, help="with --serve (default: longest + margin)")
    p.add_argument("--server-args", default="", help="extra vLLM server args for every method")
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to /health")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--out", default="eval_out", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _run_method(name: str, ep: harness.Endpoint, args, jobs) -> dict[str, Any]:
    from tqdm import tqdm

    t0 = time.monotonic()
    with tqdm(total=len(jobs), desc=name, unit="req", disable=args.quiet, file=sys.stderr) as bar:
        records = harness.run_jobs(
            ep,
            args.task,
            jobs,
            args.concurrency,
            args.max_tokens,
            args.ppl_tail,
            on_done=bar.update,
        )
    points = harness.aggregate(args.task, records)
    errors, skipped = (sum(p[k] for p in points) for k in ("errors", "skipped"))
    print(
        f"[{name}] {len(records)} requests in {time.monotonic() - t0:.0f} s: {errors} errors, "
        f"{skipped} skipped (prompt > max_model_len {ep.max_model_len})",
        file=sys.stderr,
        flush=True,
    )
    if errors and errors == len(records) - skipped:
        first = next(p["first_error"] for p in points if p["first_error"])
        print(f"[{name}] warning: every request failed; first error: {first}", file=sys.stderr)
    return {
        "name": name,
        "endpoint": ep.base_url,
        "model": ep.model,
        "max_model_len": ep.max_model_len,
        "error": None,
        "points": points,
        "records": records,
        "seconds": round(time.monotonic() - t0, 2),
    }


def _serve_method(name: str, args, ctx: methods.ServeContext, jobs, out: Path) -> dict[str, Any]:
    import shlex

    from mesa_vllm.eval.server import LocalServer, ServerError

    launch = methods.build_launch(
        name, ctx, methods.is_cpu_install(), tuple(shlex.split(args.server_args))
    )
    log = out / f"server-{name}.log"
    base = {"name": name, "launch": launch.describe(), "log": str(log), "points": []}
    print(f"[{name}] starting vLLM server (log: {log}) ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        with LocalServer(
            args.serve, launch.args, launch.env, log, served_name=name, timeout=args.server_timeout
        ) as srv:
            print(
                f"[{name}] up in {time.monotonic() - t0:.0f} s at {srv.base_url}",
                file=sys.stderr,
                flush=True,
            )
            ep = harness.connect(srv.base_url, name, args.api_key, args.request_timeout)
            res = _run_method(name, ep, args, jobs)
    except (ServerError, harness.EndpointError) as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr, flush=True)
        return {**base, "error": str(exc)}
    return {**base, **res}


def _lengths(args, train_len: int | None) -> list[int]:
    if args.lengths:
        return args.lengths
    if train_len is None:
        raise ValueError("--multiples needs --train-len (or a local model config)")
    return [m * train_len for m in (args.multiples or [1, 2, 4, 8])]


def _evaluate(args, results: dict[str, Any]) -> int:
    cfg = methods.read_model_config(args.serve or args.tokenizer or args.model or "")
    train_len = args.train_len or methods.trained_length(cfg)
    try:
        lengths = _lengths(args, train_len)
        names = methods.parse_methods(args.methods) if args.serve else [args.method_name]
    except ValueError as exc:
        return _fail(str(exc))
    tok_name = args.tokenizer or args.serve or args.model
    ep = None
    if args.base_url:
        try:
            ep = harness.connect(args.base_url, args.model, args.api_key, args.request_timeout)
        except harness.EndpointError as exc:
            return _fail(str(exc))
        tok_name = tok_name or ep.model
    try:
        tok = _tokenizer(tok_name)
    except Exception as exc:
        return _fail(
            f"cannot load tokenizer {tok_name!r} ({type(exc).__name__}); pass --tokenizer MODEL_DIR"
        )
    results["meta"].update(
        model=args.serve or (ep.model if ep else None),
        train_len=train_len,
        lengths=lengths,
        tokenizer=tok_name,
    )
    print(f"building {args.task} prompts for lengths {lengths} ...", file=sys.stderr, flush=True)
    jobs = harness.make_jobs(args.task, tok, lengths, args.samples, args.seed, args.depths)
    for n in sorted({j.length for j in jobs if j.n_tokens > j.length}):
        least = min(j.n_tokens for j in jobs if j.length == n)
        print(
            f"note: length {n} is below the shortest {args.task} prompt; its prompts have "
            f"{least}+ tokens",
            file=sys.stderr,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if ep is None and train_len is None:
        return _fail(f"cannot tell the trained length of {args.serve!r}; pass --train-len")
    if ep is not None:
        results["methods"].append({**_run_method(names[0], ep, args, jobs), "launch": None})
        return 0
    longest = max(max(j.n_tokens for j in jobs), *lengths) + max(args.max_tokens, 1)
    max_len = args.max_model_len or max(longest, train_len)
    ctx = methods.ServeContext(
        args.serve, train_len, max_len, methods.rope_theta(cfg), args.mesa_config
    )
    for name in names:
        results["methods"].append(_serve_method(name, args, ctx, jobs, out))
    return 2 if any(m.get("error") for m in results["methods"]) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesa-vllm eval``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.train_len is not None and args.train_len < 2:
        return _fail("--train-len must be >= 2")
    if args.samples < 1 or args.concurrency < 1:
        return _fail("--samples and --concurrency must be >= 1")
    results: dict[str, Any] = {
        "task": args.task,
        "meta": {
            "samples": args.samples,
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "depths": args.depths if args.task == "needle" else None,
            "ppl_tail": args.ppl_tail,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "methods": [],
    }
    old = _install_sigterm()
    code = 130
    try:
        code = _evaluate(args, results)
    except KeyboardInterrupt:
        print("interrupted; servers stopped; writing partial results", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old)
    if results["methods"]:
        paths = report.write_all(results, args.out)
        print(paths["table"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return code


def _install_sigterm():
    """SIGTERM -> KeyboardInterrupt, so servers are stopped and partial results written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return signal.getsignal(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
