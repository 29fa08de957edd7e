"""``mesa-vllm eval TASK[,TASK...]``: compare extrapolation methods in one invocation.

Tasks: ``passkey``, ``needle``, ``ppl`` (docs/EVAL.md).  Either evaluate a running
OpenAI-compatible endpoint as one method::

    mesa-vllm eval passkey --base-url http://127.0.0.1:8000 --method-name mesa \\
        --tokenizer MODEL_DIR --train-len 256 --multiples 1,2,4,8

or start a local vLLM server per method (always stopped afterwards); several tasks share each
method's server, and ``--parallel-servers K`` runs up to K methods' servers at once::

    mesa-vllm eval passkey,needle,ppl --serve MODEL_DIR --methods stock-raised,mesa,yarn \\
        --multiples 1,2,4,8,16,32 --samples 20 --text ~/.cache/mesa_vllm/corpus/pydoc.txt \\
        --ppl-tail 256 --parallel-servers 4 --out out/

Writes ``results.json``, ``table.md`` and PNG plots to ``--out`` (one task) or to
``--out/<task>/`` (several); prints each table.  ``eval corpus pydoc [--out FILE]`` builds the
real-text corpus (``mesa_vllm.eval.corpus``).  Each method's finished task is saved at once
under ``<task dir>/partial/``; ``eval report DIR`` rebuilds the tables of a run that was
stopped before it wrote them.
Exit codes: 0 all methods evaluated; 2 bad arguments, endpoint unreachable or a server that
did not start (results of the other methods are still written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mesa_vllm.eval import harness, methods, parallel, report

_PRINT_LOCK = threading.Lock()
_T0 = [time.monotonic()]


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


def _task_spec(text: str) -> str:
    """``"passkey,ppl"`` -> the same string, validated and deduplicated (order kept)."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in names if t not in harness.TASKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown task(s) {', '.join(bad) or repr(text)}; known: {', '.join(harness.TASKS)} "
            "(several comma-separated)"
        )
    return ",".join(names)


def parse_tasks(spec: str) -> list[str]:
    """The tasks of a positional TASK argument: ``"passkey,ppl"`` -> ``["passkey", "ppl"]``."""
    return _task_spec(spec).split(",")


def _caps(text: str) -> dict[int, int]:
    """``"16384:8,32768:4"`` -> ``{16384: 8, 32768: 4}`` (LEN:N pairs, both positive)."""
    caps: dict[int, int] = {}
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        try:
            length, n = (int(v) for v in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LEN:N[,LEN:N], got {text!r}") from None
        if length <= 0 or n <= 0:
            raise argparse.ArgumentTypeError(f"LEN and N must be positive, got {part!r}")
        caps[length] = n
    if not caps:
        raise argparse.ArgumentTypeError(f"expected LEN:N[,LEN:N], got {text!r}")
    return caps


def sample_cap(caps: dict[int, int] | None, length: int) -> int | None:
    """The most samples allowed at ``length``: the smallest N of the caps with LEN <= length."""
    ns = [n for lim, n in (caps or {}).items() if length >= lim]
    return min(ns) if ns else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesa-vllm eval",
        description="Long-context evaluation: passkey, needle, perplexity "
        "(`mesa-vllm eval corpus pydoc` builds the real-text corpus for ppl --text).",
    )
    p.add_argument(
        "task",
        type=_task_spec,
        metavar="TASK[,TASK...]",
        help=f"one or several comma-separated of: {', '.join(harness.TASKS)}",
    )
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
    p.add_argument(
        "--needle-samples",
        type=int,
        help="needle samples per depth x length cell (default: --samples)",
    )
    p.add_argument(
        "--ppl-samples",
        type=int,
        help="perplexity texts (windows) per length (default: --samples)",
    )
    p.add_argument(
        "--max-samples-at",
        type=_caps,
        metavar="LEN:N[,LEN:N]",
        help="at most N samples (per cell) at lengths >= LEN, e.g. 32768:4",
    )
    p.add_argument(
        "--max-samples-methods",
        metavar="M1,M2",
        help="methods the --max-samples-at caps apply to (default: all)",
    )
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
    p.add_argument(
        "--text",
        metavar="FILE",
        help="ppl on windows of this text file (e.g. the `eval corpus pydoc` output) "
        "instead of synthetic filler",
    )
    p.add_argument(
        "--ppl-shared-end",
        action="store_true",
        help="with --text: text i of every length ends at the same corpus token, so every "
        "length scores the same last --ppl-tail tokens after more context",
    )
    p.add_argument("--tokenizer", help="tokenizer dir/name (default: --serve dir or --model)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per method")
    p.add_argument(
        "--parallel-servers",
        type=int,
        default=1,
        metavar="K",
        help="with --serve, run up to K methods' servers at once (GPU: each gets "
        "--gpu-memory-utilization 0.9/K unless --server-args sets it)",
    )
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


def _say(name: str, msg: str) -> None:
    with _PRINT_LOCK:
        print(f"[{name}] {msg} (t+{time.monotonic() - _T0[0]:.0f} s)", file=sys.stderr, flush=True)


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def task_samples(task: str, args) -> int:
    """Samples per length (per depth x length cell for needle) of ``task``."""
    if task == "needle" and args.needle_samples is not None:
        return args.needle_samples
    if task == "ppl" and args.ppl_samples is not None:
        return args.ppl_samples
    return args.samples


def method_jobs(name: str, jobs: list[harness.Job], args) -> list[harness.Job]:
    """The jobs of method ``name``: all, or those under the --max-samples-at caps."""
    if not args.max_samples_at:
        return jobs
    if args.max_samples_methods is not None:
        capped = {m.strip() for m in args.max_samples_methods.split(",") if m.strip()}
        if name not in capped:
            return jobs
    out = []
    for j in jobs:
        cap = sample_cap(args.max_samples_at, j.length)
        if cap is None or j.index < cap:
            out.append(j)
    return out


def task_dir(out: Path, task: str, results: dict[str, dict]) -> Path:
    """Where ``task``'s tables go: ``out`` for a single task, ``out/<task>`` for several."""
    return out if len(results) == 1 else out / task


def _run_task(name: str, task: str, ep: harness.Endpoint, args, jobs, cancel=None) -> dict:
    from tqdm import tqdm

    t0 = time.monotonic()
    quiet = args.quiet or args.parallel_servers > 1  # bars of several threads would interleave
    with tqdm(
        total=len(jobs), desc=f"{name} {task}", unit="req", disable=quiet, file=sys.stderr
    ) as bar:
        records = harness.run_jobs(
            ep,
            task,
            jobs,
            args.concurrency,
            args.max_tokens,
            args.ppl_tail,
            on_done=bar.update,
            cancel=cancel,
        )
    points = harness.aggregate(task, records)
    errors = sum(p["errors"] for p in points)
    cancelled = sum(1 for r in records if r["skipped"] == "cancelled")
    too_long = sum(1 for r in records if r["skipped"]) - cancelled
    seconds = time.monotonic() - t0
    _say(
        name,
        f"{task}: {len(records)} requests in {seconds:.0f} s: {errors} errors, "
        f"{too_long} skipped (prompt > max_model_len {ep.max_model_len})"
        + (f", {cancelled} not sent (interrupted)" if cancelled else ""),
    )
    if errors and errors == len(records) - too_long - cancelled:
        first = next(p["first_error"] for p in points if p["first_error"])
        _say(name, f"warning: every {task} request failed; first error: {first}")
    return {
        "name": name,
        "endpoint": ep.base_url,
        "model": ep.model,
        "max_model_len": ep.max_model_len,
        "error": None,
        "points": points,
        "records": records,
        "seconds": round(seconds, 2),
    }


def _timing(name: str, start_s: float | None, evals: dict[str, float], error=None) -> dict:
    return {
        "method": name,
        "server_start_s": None if start_s is None else round(start_s, 2),
        "eval_s": {t: round(s, 2) for t, s in evals.items()},
        "total_s": round((start_s or 0.0) + sum(evals.values()), 2),
        "error": error,
    }


def _serve_method(
    name: str,
    args,
    ctx: methods.ServeContext,
    task_jobs: dict[str, list[harness.Job]],
    out: Path,
    pool: parallel.ServerPool,
    share: float | None,
    results: dict[str, dict],
) -> tuple[dict[str, dict], dict] | None:
    """Start ``name``'s server, run every task against it, stop it.

    Returns ({task: method entry}, timing); when cancelled, the tasks finished before that
    (None if none finished)."""
    from mesa_vllm.eval.server import LocalServer, ServerError

    extra = tuple(shlex.split(args.server_args))
    if share is not None:
        extra = (parallel.UTIL_FLAG, f"{share:g}", *extra)
    launch = methods.build_launch(name, ctx, methods.is_cpu_install(), extra)
    log = out / f"server-{name}.log"
    base = {"name": name, "launch": launch.describe(), "log": str(log), "points": []}
    srv = LocalServer(
        args.serve, launch.args, launch.env, log, served_name=name, timeout=args.server_timeout
    )
    entries: dict[str, dict] = {}
    evals: dict[str, float] = {}
    start_s = None
    with pool.track(srv):
        try:
            with pool.gate() as waited:
                if pool.cancel.is_set():
                    return None
                if waited >= 1:
                    _say(name, f"waited {waited:.0f} s for the GPU start slot")
                _say(name, f"starting vLLM server (log: {log}) ...")
                t0 = time.monotonic()
                srv.start()
                start_s = time.monotonic() - t0
            _say(name, f"up in {start_s:.0f} s at {srv.base_url}")
            ep = harness.connect(srv.base_url, name, args.api_key, args.request_timeout)
            for task, jobs in task_jobs.items():
                res = _run_task(name, task, ep, args, method_jobs(name, jobs, args), pool.cancel)
                if pool.cancel.is_set():
                    break  # the task in flight was cut short: keep only the finished ones
                evals[task] = res["seconds"]
                entries[task] = {**base, **res}
                report.write_partial(results[task], entries[task], task_dir(out, task, results))
        except (ServerError, harness.EndpointError) as exc:
            if pool.cancel.is_set():
                return None
            msg = str(exc)
            _say(name, f"error: {msg}")
            for task in task_jobs:
                entries.setdefault(task, {**base, "error": msg})
            return entries, _timing(name, start_s, evals, msg.splitlines()[0])
        finally:
            with pool.gate():
                srv.stop()
    if pool.cancel.is_set():  # interrupted: the tasks that finished before it still count
        return (entries, _timing(name, start_s, evals, "interrupted")) if entries else None
    timing = _timing(name, start_s, evals)
    _say(
        name,
        f"done in {timing['total_s']:.0f} s (server start {start_s:.0f} s, eval "
        f"{sum(evals.values()):.0f} s)",
    )
    return entries, timing


def _lengths(args, train_len: int | None) -> list[int]:
    if args.lengths:
        return args.lengths
    if train_len is None:
        raise ValueError("--multiples needs --train-len (or a local model config)")
    return [m * train_len for m in (args.multiples or [1, 2, 4, 8])]


def _load_text(args, tok) -> tuple[list[int] | None, list[int], dict | None]:
    """(corpus token ids, prefix, meta) for ppl --text; (None, [], None) without --text."""
    if not args.text:
        return None, [], None
    from mesa_vllm.eval import corpus

    path = Path(args.text).expanduser()
    text = corpus.load_corpus(path)
    print(f"tokenizing {path} ({len(text)} characters) ...", file=sys.stderr, flush=True)
    ids = corpus.tokenize(tok, text)
    prefix = corpus.bos_prefix(tok)
    meta = {
        "path": str(path.resolve()),
        "characters": len(text),
        "tokens": len(ids),
        "bos": bool(prefix),
        "provenance": corpus.provenance(path),
    }
    return ids, prefix, meta


def _evaluate(args, tasks: list[str], results: dict[str, dict], timings: list[dict]) -> int:
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
    for res in results.values():
        res["meta"].update(
            model=args.serve or (ep.model if ep else None),
            train_len=train_len,
            lengths=lengths,
            tokenizer=tok_name,
        )
    task_jobs: dict[str, list[harness.Job]] = {}
    for task in tasks:
        text_ids, prefix = None, []
        if task == "ppl" and args.text:
            from mesa_vllm.eval.corpus import CorpusError

            try:
                text_ids, prefix, text_meta = _load_text(args, tok)
            except CorpusError as exc:
                return _fail(str(exc))
            results[task]["meta"]["text"] = text_meta
        print(f"building {task} prompts for lengths {lengths} ...", file=sys.stderr, flush=True)
        try:
            jobs = harness.make_jobs(
                task,
                tok,
                lengths,
                task_samples(task, args),
                args.seed,
                args.depths,
                text_ids=text_ids,
                text_prefix=prefix,
                shared_end=args.ppl_shared_end,
            )
        except ValueError as exc:
            return _fail(f"{task}: {exc}")
        for n in sorted({j.length for j in jobs if j.n_tokens > j.length}):
            least = min(j.n_tokens for j in jobs if j.length == n)
            print(
                f"note: length {n} is below the shortest {task} prompt; its prompts have "
                f"{least}+ tokens",
                file=sys.stderr,
            )
        task_jobs[task] = jobs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if ep is None and train_len is None:
        return _fail(f"cannot tell the trained length of {args.serve!r}; pass --train-len")
    if ep is not None:
        evals = {}
        for task, jobs in task_jobs.items():
            res = _run_task(names[0], task, ep, args, method_jobs(names[0], jobs, args))
            results[task]["methods"].append({**res, "launch": None})
            evals[task] = res["seconds"]
        timings.append(_timing(names[0], None, evals))
        return 0
    all_jobs = [j for jobs in task_jobs.values() for j in jobs]
    longest = max(max(j.n_tokens for j in all_jobs), *lengths) + max(args.max_tokens, 1)
    max_len = args.max_model_len or max(longest, train_len)
    ctx = methods.ServeContext(
        args.serve, train_len, max_len, methods.rope_theta(cfg), args.mesa_config
    )
    cpu = methods.is_cpu_install()
    k = parallel.effective_parallel(args.parallel_servers, len(names))
    share = parallel.memory_share(k, shlex.split(args.server_args), cpu)
    gated = parallel.needs_start_gate(k, shlex.split(args.server_args), cpu)
    pool = parallel.ServerPool(gated=gated)
    for res in results.values():
        res["meta"].update(parallel_servers=k, gpu_memory_share=share)
    if k > 1:
        print(
            f"running up to {k} servers at once"
            + (f", each with {parallel.UTIL_FLAG} {share:g}" if share else "")
            + ("; GPU starts one at a time" if gated else ""),
            file=sys.stderr,
            flush=True,
        )
    slots: list = [None] * len(names)

    def work(name: str):
        return _serve_method(name, args, ctx, task_jobs, out, pool, share, results)

    try:
        parallel.run_all(names, k, work, pool, slots)
    finally:
        for slot in slots:
            if slot is None:
                continue
            entries, timing = slot
            for task in tasks:
                if task in entries:  # an interrupted method lacks its unfinished tasks
                    results[task]["methods"].append(entries[task])
            timings.append(timing)
    return 2 if any(m.get("error") for r in results.values() for m in r["methods"]) else 0


def timing_table(timings: list[dict], tasks: list[str]) -> str:
    """Per-method wall times as aligned text (server start, eval per task, total)."""
    header = ["method", "server start s", *[f"{t} s" for t in tasks], "total s"]
    rows = []
    for t in timings:
        start = "-" if t["server_start_s"] is None else f"{t['server_start_s']:.1f}"
        evals = [f"{t['eval_s'][k]:.1f}" if k in t["eval_s"] else "-" for k in tasks]
        rows.append([t["method"], start, *evals, f"{t['total_s']:.1f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    )


def _new_results(task: str, args, tasks: list[str]) -> dict[str, Any]:
    return {
        "task": task,
        "meta": {
            "samples": task_samples(task, args),
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "depths": args.depths if task == "needle" else None,
            "ppl_tail": args.ppl_tail,
            **({"ppl_shared_end": args.ppl_shared_end} if task == "ppl" else {}),
            **({"text": None} if task == "ppl" else {}),  # None: synthetic filler
            "tasks": tasks,
            "max_samples_at": args.max_samples_at,
            "max_samples_methods": args.max_samples_methods,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "methods": [],
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesa-vllm eval``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "corpus":
        from mesa_vllm.eval import corpus

        return corpus.main(argv[1:])
    if argv and argv[0] == "report":
        return _report_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    tasks = parse_tasks(args.task)
    if args.train_len is not None and args.train_len < 2:
        return _fail("--train-len must be >= 2")
    if args.samples < 1 or args.concurrency < 1:
        return _fail("--samples and --concurrency must be >= 1")
    for flag in ("needle_samples", "ppl_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            return _fail(f"--{flag.replace('_', '-')} must be >= 1")
    if args.parallel_servers < 1:
        return _fail("--parallel-servers must be >= 1")
    if args.ppl_tail is not None and args.ppl_tail < 1:
        return _fail("--ppl-tail must be >= 1")
    if args.ppl_shared_end and not args.text:
        return _fail("--ppl-shared-end needs --text (synthetic filler has no corpus to share)")
    if args.text and "ppl" not in tasks:
        return _fail("--text is for the ppl task")
    if args.max_samples_methods is not None and args.serve:
        try:
            methods.parse_methods(args.max_samples_methods)
        except ValueError as exc:
            return _fail(f"--max-samples-methods: {exc}")
    _T0[0] = time.monotonic()
    results = {t: _new_results(t, args, tasks) for t in tasks}
    timings: list[dict] = []
    old = _install_sigterm()
    code = 130
    try:
        code = _evaluate(args, tasks, results, timings)
    except KeyboardInterrupt:
        print("interrupted; servers stopped; writing partial results", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old)
    wall = round(time.monotonic() - _T0[0], 2)
    for res in results.values():
        res["meta"].update(timings=timings, wall_s=wall)
    for task, res in results.items():
        if res["methods"]:
            paths = report.write_all(res, task_dir(Path(args.out), task, results))
            print(paths["table"].read_text())
            print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if timings:
        print(
            f"wall time per method ({wall:.0f} s in all):\n" + timing_table(timings, tasks),
            file=sys.stderr,
        )
    return code


def _report_main(argv: list[str]) -> int:
    """``eval report DIR [DIR ...]``: tables and plots of a stopped run from each task
    directory's ``partial/`` snapshots (written as each method finishes a task)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mesa-vllm eval report TASK_DIR [TASK_DIR ...]", file=sys.stderr)
        return 0 if argv else 2
    for d in argv:
        try:
            paths = report.rebuild(d)
        except FileNotFoundError as exc:
            return _fail(str(exc))
        print(paths["table"].read_text())
    return 0


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
