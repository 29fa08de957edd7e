"""``mesa-vllm tune MODEL_DIR``: measure Mesa settings on your model, write the best as a config.

The best Mesa setting differs per model.  On SmolLM2-135M-Instruct (L = 8192) the stair width
``auto`` beats the paper's E = 50 at every length from 2x; on the bundled 256-token passkey
model the fixed E = 64 beats ``auto`` at every length from 2x (docs/TUNE.md has the numbers).
So this command runs ``mesa-vllm eval passkey --serve MODEL_DIR`` (the same harness, prompts
and server launcher) over a few candidate settings, ranks them and writes the winner as the
JSON that ``--additional-config`` takes::

    mesa-vllm tune MODEL_DIR --multiples 2,4,8 --samples 10 --write mesa.json
    mesa-vllm serve MODEL_DIR --attention-backend mesa \\
        --additional-config "$(cat mesa.json)" --max-model-len N

Candidates are Mesa-backend method strings of ``mesa-vllm eval`` (``mesa``,
``mesa@stair_width=auto``, ``mesa-leaky-rerope``, ``self-extend@group_size=4`` ...; see
``mesa_vllm.eval.methods``); ``--mesa-config`` gives the base settings that ``mesa`` and the
chunked variants start from, exactly as in ``eval``.  The default grid, for trained length L:

- ``mesa``: the base settings (the paper's E = 50 unless ``--mesa-config`` says otherwise),
  so the result is never worse than what you would serve without tuning;
- ``mesa@stair_width=auto``: the smallest E that keeps every position inside L, per length
  (the finest stair that fits; best on SmolLM2);
- ``mesa@stair_width=<L // 4>``: a coarse fixed stair (the far context squeezed into a few
  positions per L of prompt; the toy model's tuned E = 64 = L / 4, best there);
  these three span the E axis from fine to coarse, the one knob that moved accuracy most;
- ``mesa-leaky-rerope``: Mesa's chunked prefill with Leaky-ReRoPE for the last chunk, the
  weave hybrid that is still linear in the prompt length;
- ``mesa@split=fixed@middle_chunk=<2 Lc>@near_window=<Lc>``: a narrow fixed grid (middle
  chunks of 2 Lc, capped at L - F) with a near window of Lc (capped at L - F - 1), the best
  setting measured on SmolLM2 (passkey 0.80-0.95 at 2x-8x against 0.10-0.40 with the
  paper's plan); it also allows exact prefix caching.

The unchunked weave variants (``leaky-rerope``, ``self-extend``, ...) are left out of the
default because their prefill is O(T²) (slow and memory-hungry at long lengths); pass them in
``--candidates`` to include them.  Candidates whose resolved settings are equal (e.g. the base
already has E = L // 4) are measured once.

Score of a candidate: its accuracy at every (task, length) cell (needle: the mean over
depths; a cell with no answered sample counts 0), ranked by the mean over the cells, then the
higher minimum, then the earlier candidate.  A candidate whose server did not start ranks
last and is never chosen.

``--write FILE`` (default ``OUT/mesa.json``) gets ``{"mesa": {...}}``: exactly the
``--additional-config`` the chosen candidate's server was started with (``train_len``, the
base settings, ``pe`` / ``chunked_prefill`` of a weave variant, its ``@`` settings).
``FILE.scores.json`` beside it records the command, the scores of every candidate and the
ranking.  vLLM 0.26 reads ``--additional-config`` as JSON text only: a value that is not a
``{...}`` object is kept as a plain string, not opened as a file
(``vllm.engine.arg_utils.union_dict_and_str``), hence ``"$(cat FILE)"``.  Some defaults of
the weave variants (``leaky_factor``, ``group_size``) are resolved from max-model-len at
startup, so serve with the max-model-len that was measured (printed; ``--max-model-len``
sets it).

Exit codes: 0 every candidate measured and the config written; 2 bad arguments, or a
candidate not evaluated (the config is then the best of the others, if any); 130 interrupted
(nothing written).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mesa_vllm.eval import cli as eval_cli
from mesa_vllm.eval import methods, report
from mesa_vllm.plan import MesaParams

TUNE_TASKS = ("passkey", "needle")
DEFAULT_MULTIPLES = (2, 4, 8)
DEFAULT_SAMPLES = 10
CONFIG_FLAG = "--additional-config"
_OWNED_FLAGS = ("--attention-backend", CONFIG_FLAG)


def default_candidates(train_len: int, base: dict[str, Any] | None = None) -> list[str]:
    """The default grid for trained length ``train_len`` and the base settings ``base``
    (--mesa-config, whose F and Lc size the narrow grid; the module doc says why)."""
    base, paper = base or {}, MesaParams(train_len)
    first = base.get("first_chunk", paper.first_chunk)
    last = base.get("last_chunk", paper.last_chunk)
    width, near = min(2 * last, train_len - first), min(last, train_len - first - 1)
    return [
        "mesa",
        "mesa@stair_width=auto",
        f"mesa@stair_width={max(1, train_len // 4)}",
        "mesa-leaky-rerope",
        f"mesa@split=fixed@middle_chunk={width}@near_window={near}",
    ]


def parse_candidates(spec: str) -> list[str]:
    """``"mesa,mesa@stair_width=auto"`` -> the names; ValueError for an unknown method, bad
    ``@`` settings or a method not served by the Mesa backend (naming the allowed ones)."""
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    allowed = ", ".join(sorted(methods.MESA_BACKEND_METHODS))
    if not names:
        raise ValueError(f"no candidate in {spec!r}; allowed: {allowed}")
    for name in names:
        base, _ = methods.split_method(name)
        if base not in methods.MESA_BACKEND_METHODS:
            raise ValueError(
                f"candidate {name!r} is not served by the Mesa backend, so it has no Mesa "
                f"config to write; allowed: {allowed} (each optionally with @key=value "
                "settings, e.g. mesa@stair_width=auto)"
            )
    return names


def config_of_args(args: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The ``--additional-config`` JSON object of a server's argument list (the first one:
    build_launch puts the method's flags before the user's extras)."""
    args = list(args)
    if CONFIG_FLAG not in args or args.index(CONFIG_FLAG) + 1 >= len(args):
        raise ValueError(f"no {CONFIG_FLAG} in the server arguments {args}")
    return json.loads(args[args.index(CONFIG_FLAG) + 1])


def max_len_of_args(args: list[str] | tuple[str, ...]) -> int | None:
    """The ``--max-model-len`` of a server's argument list (the last one, as argparse)."""
    args = list(args)
    idx = [i for i, a in enumerate(args) if a == "--max-model-len" and i + 1 < len(args)]
    return int(args[idx[-1] + 1]) if idx else None


def mesa_setting(name: str, ctx: methods.ServeContext) -> dict[str, Any]:
    """The ``{"mesa": {...}}`` that ``build_launch`` passes for candidate ``name``."""
    return config_of_args(methods.build_launch(name, ctx, cpu=False).args)


def dedupe(names: list[str], ctx: methods.ServeContext) -> tuple[list[str], dict[str, str]]:
    """(candidates with distinct settings, {dropped name: the earlier one it equals})."""
    kept: list[str] = []
    seen: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for name in names:
        key = json.dumps(mesa_setting(name, ctx), sort_keys=True)
        if key in seen:
            dropped[name] = seen[key]
        else:
            seen[key] = name
            kept.append(name)
    return kept, dropped


@dataclass
class Score:
    """One candidate's cells ({(task, length): accuracy or None}), mean and min."""

    name: str
    order: int
    cells: dict[tuple[str, int], float | None] = field(default_factory=dict)
    error: str | None = None
    launch: dict[str, Any] | None = None
    max_model_len: int | None = None

    @property
    def values(self) -> list[float]:
        return [0.0 if v is None else v for v in self.cells.values()]

    @property
    def mean(self) -> float | None:
        vals = self.values
        return None if self.error or not vals else sum(vals) / len(vals)

    @property
    def min(self) -> float | None:
        vals = self.values
        return None if self.error or not vals else min(vals)


def scores(results: dict[str, dict[str, Any]], candidates: list[str]) -> list[Score]:
    """Per-candidate scores (in ``candidates`` order) from ``{task: results}`` as
    ``mesa-vllm eval`` writes them (``report`` module doc); a candidate missing from a task's
    results (interrupted) or with an error there is marked with that error."""
    out = []
    for i, name in enumerate(candidates):
        sc = Score(name, i)
        for task, res in results.items():
            lengths = res.get("meta", {}).get("lengths") or []
            entry = next((m for m in res["methods"] if m["name"] == name), None)
            if entry is None:
                sc.error = sc.error or f"{task}: not evaluated"
                continue
            if entry.get("error"):
                sc.error = sc.error or entry["error"].splitlines()[0]
            sc.launch = sc.launch or entry.get("launch")
            sc.max_model_len = sc.max_model_len or entry.get("max_model_len")
            accs = report.by_length(entry, task)
            for n in sorted(set(lengths) | set(accs)):
                sc.cells[(task, n)] = accs.get(n)
        out.append(sc)
    return out


def rank(items: list[Score]) -> list[Score]:
    """Best first: higher mean, then higher minimum, then the earlier candidate; the ones
    with an error (or no cell) last, in candidate order."""

    def key(s: Score):
        if s.mean is None:
            return (1, 0.0, 0.0, s.order)
        return (0, -s.mean, -s.min, s.order)

    return sorted(items, key=key)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _label(task: str, n: int, train_len: int | None, tasks: list[str]) -> str:
    what = f"{n // train_len}x" if train_len and n % train_len == 0 else str(n)
    return what if len(tasks) == 1 else f"{task} {what}"


def table(ranked: list[Score], train_len: int | None) -> str:
    """Aligned text: rank, candidate, one column per (task, length), mean, min; the chosen
    (first, when it has a score) marked with ``*``."""
    cells = sorted({c for s in ranked for c in s.cells}, key=lambda c: (c[0] != "passkey", c))
    tasks = list(dict.fromkeys(t for t, _ in cells))
    header = ["", "candidate", *[_label(t, n, train_len, tasks) for t, n in cells], "mean", "min"]
    rows = []
    for i, s in enumerate(ranked):
        mark = "*" if i == 0 and s.mean is not None else " "
        if s.error:  # the reason is in the scores file and the eval table's notes
            rows.append([mark, s.name, "error", *[""] * (len(cells) + 1)])
            continue
        rows.append(
            [mark, s.name, *[_fmt(s.cells.get(c)) for c in cells], _fmt(s.mean), _fmt(s.min)]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def scores_path(config_path: str | Path) -> Path:
    """``FILE`` -> ``FILE.scores.json`` (beside it)."""
    p = Path(config_path)
    return p.with_name(p.name + ".scores.json")


def write_config(path: str | Path, setting: dict[str, Any]) -> Path:
    """Write ``{"mesa": {...}}`` as JSON (nothing else: vLLM takes the file's text as is)."""
    if set(setting) != {"mesa"} or not isinstance(setting["mesa"], dict):
        raise ValueError(f'expected {{"mesa": {{...}}}}, got {setting!r}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(setting, indent=1, sort_keys=True) + "\n")
    return path


def serve_command(model: str, config_path: str | Path, max_model_len: int | None) -> str:
    """The ``mesa-vllm serve`` line that serves ``model`` with the written config."""
    cfg = shlex.quote(str(config_path))
    line = (
        f"mesa-vllm serve {shlex.quote(str(model))} --attention-backend mesa "
        f'--additional-config "$(cat {cfg})"'
    )
    return line + (f" --max-model-len {max_model_len}" if max_model_len else "")


def provenance(
    ranked: list[Score],
    command: str,
    meta: dict[str, Any],
    config_path: Path | None,
    result_files: list[Path],
    dropped: dict[str, str],
) -> dict[str, Any]:
    """The scores file's content: what was run, every candidate's numbers, the ranking."""
    chosen = ranked[0] if ranked and ranked[0].mean is not None else None
    return {
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "results": [str(p) for p in result_files],
        "config": None if config_path is None else str(config_path),
        "chosen": chosen.name if chosen else None,
        "score": "mean accuracy over (task, length) cells; ties: higher min, earlier candidate",
        "duplicates": dropped,
        "ranking": [
            {
                "rank": i + 1,
                "candidate": s.name,
                "mean": s.mean,
                "min": s.min,
                "error": s.error,
                "scores": _nested(s.cells),
                "config": None if s.launch is None else config_of_args(s.launch["args"]),
                "max_model_len": s.max_model_len,
            }
            for i, s in enumerate(ranked)
        ],
    }


def _nested(cells: dict[tuple[str, int], float | None]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for (task, n), v in sorted(cells.items()):
        out.setdefault(task, {})[str(n)] = v
    return out


@dataclass
class Decision:
    """What ``decide`` ranked, chose and wrote."""

    ranked: list[Score]
    best: Score | None
    max_model_len: int | None
    config_path: Path | None
    scores_path: Path


def decide(
    results: dict[str, dict[str, Any]],
    candidates: list[str],
    config_path: str | Path,
    command: str,
    meta: dict[str, Any],
    result_files: Sequence[Path] = (),
    dropped: dict[str, str] | None = None,
) -> Decision:
    """Rank the candidates of ``{task: eval results}``; write the best one's config to
    ``config_path`` (when one was evaluated) and the scores to ``FILE.scores.json``."""
    ranked = rank(scores(results, candidates))
    best = ranked[0] if ranked and ranked[0].mean is not None else None
    if best is not None and best.launch is None:
        raise ValueError(f"{best.name}: its results hold no launch arguments")
    config_path = Path(config_path)
    sp = scores_path(config_path)
    sp.parent.mkdir(parents=True, exist_ok=True)
    max_len = None
    written = None
    if best is not None:
        written = write_config(config_path, config_of_args(best.launch["args"]))
        max_len = max_len_of_args(best.launch["args"]) or best.max_model_len
    meta = {**meta, "max_model_len": max_len}
    report.write_json(
        provenance(ranked, command, meta, written, list(result_files), dropped or {}), sp
    )
    return Decision(ranked, best, max_len, written, sp)


def _tasks(text: str) -> str:
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in names if t not in TUNE_TASKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"tune scores accuracy: tasks are {', '.join(TUNE_TASKS)} (comma-separated), "
            f"got {text!r}"
        )
    return ",".join(names)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesa-vllm tune",
        description="Measure Mesa settings on a model (one vLLM server per candidate, the "
        "`mesa-vllm eval` harness) and write the best as an --additional-config JSON file.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="the model directory to serve")
    p.add_argument(
        "--candidates",
        help="comma-separated Mesa-backend methods with optional @key=value settings "
        f"(allowed: {', '.join(sorted(methods.MESA_BACKEND_METHODS))}); default: mesa, "
        "mesa@stair_width=auto, mesa@stair_width=<L//4>, mesa-leaky-rerope",
    )
    p.add_argument("--tasks", type=_tasks, default="passkey", help="passkey and/or needle")
    p.add_argument(
        "--multiples",
        type=eval_cli._ints,
        default=list(DEFAULT_MULTIPLES),
        help="prompt lengths as multiples of L (default 2,4,8)",
    )
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per length")
    p.add_argument("--train-len", type=int, help="trained length L (default: model config)")
    p.add_argument(
        "--mesa-config",
        type=eval_cli._json_obj,
        default={},
        help="JSON base Mesa settings (as for eval), e.g. '{\"first_chunk\": 32}'",
    )
    p.add_argument("--max-model-len", type=int, help="serve length (default: longest + margin)")
    p.add_argument("--server-args", default="", help="extra vLLM server args for every server")
    p.add_argument("--parallel-servers", type=int, default=1, metavar="K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per server")
    p.add_argument("--server-timeout", type=float, default=600.0, help="seconds to /health")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--out", default="tune_out", help="directory of the eval results")
    p.add_argument("--write", metavar="FILE", help="the chosen config (default: OUT/mesa.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _say(msg: str) -> None:
    print(f"tune: {msg}", file=sys.stderr, flush=True)


def _eval_argv(args, candidates: list[str]) -> list[str]:
    argv = [
        args.tasks,
        "--serve",
        args.model,
        "--methods",
        ",".join(candidates),
        "--multiples",
        ",".join(str(m) for m in args.multiples),
        "--samples",
        str(args.samples),
        "--mesa-config",
        json.dumps(args.mesa_config),
        "--parallel-servers",
        str(args.parallel_servers),
        "--seed",
        str(args.seed),
        "--concurrency",
        str(args.concurrency),
        "--server-timeout",
        str(args.server_timeout),
        "--request-timeout",
        str(args.request_timeout),
        "--out",
        args.out,
    ]
    if args.train_len is not None:
        argv += ["--train-len", str(args.train_len)]
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.server_args:
        argv += ["--server-args", args.server_args]
    if args.quiet:
        argv.append("--quiet")
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesa-vllm tune``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.base_url:
        return _fail(
            "tune starts one server per candidate, so it takes MODEL_DIR, not --base-url "
            "(to measure a running server use `mesa-vllm eval TASK --base-url URL`)"
        )
    if args.samples < 1 or args.parallel_servers < 1:
        return _fail("--samples and --parallel-servers must be >= 1")
    owned = [a for a in shlex.split(args.server_args) if a.split("=")[0] in _OWNED_FLAGS]
    if owned:
        return _fail(
            f"--server-args may not set {', '.join(owned)}: tune sets the Mesa backend and "
            "config of each candidate (base settings go in --mesa-config)"
        )
    train_len = args.train_len or methods.trained_length(methods.read_model_config(args.model))
    if train_len is None:
        return _fail(f"cannot tell the trained length of {args.model!r}; pass --train-len")
    try:
        names = (
            parse_candidates(args.candidates)
            if args.candidates
            else default_candidates(train_len, args.mesa_config)
        )
        ctx = methods.ServeContext(args.model, train_len, train_len, mesa_config=args.mesa_config)
        candidates, dropped = dedupe(names, ctx)
    except ValueError as exc:
        return _fail(str(exc))
    for name, same in dropped.items():
        _say(f"{name} has the same settings as {same}; measured once")
    tasks = args.tasks.split(",")
    lengths = [m * train_len for m in args.multiples]
    _say(
        f"{len(candidates)} candidates ({', '.join(candidates)}) x {len(tasks)} task(s) x "
        f"lengths {lengths} (L = {train_len}) x {args.samples} samples; one server each"
    )
    t0 = time.time()
    code = eval_cli.main(_eval_argv(args, candidates))
    if code == 130:
        _say("interrupted; no config written")
        return 130
    out = Path(args.out)
    files = [out / "results.json"] if len(tasks) == 1 else [out / t / "results.json" for t in tasks]
    results: dict[str, dict[str, Any]] = {}
    for task, path in zip(tasks, files, strict=True):
        if not path.is_file() or path.stat().st_mtime < t0 - 1:
            return _fail(f"the evaluation wrote no {path} (exit code {code})")
        results[task] = json.loads(path.read_text())
    meta = {
        "model": args.model,
        "train_len": train_len,
        "tasks": tasks,
        "multiples": args.multiples,
        "lengths": lengths,
        "samples": args.samples,
        "seed": args.seed,
        "mesa_config": args.mesa_config,
        "server_args": args.server_args,
        "candidates": candidates,
    }
    command = shlex.join(["mesa-vllm", "tune", *argv])
    config_path = Path(args.write) if args.write else out / "mesa.json"
    d = decide(results, candidates, config_path, command, meta, files, dropped)
    print(f"\nMesa settings ranked by mean accuracy over lengths (* = chosen), L = {train_len}:")
    print(table(d.ranked, train_len))
    if d.best is None:
        return _fail(f"no candidate was evaluated; nothing chosen (scores: {d.scores_path})")
    _say(f"chosen {d.best.name}: mean {d.best.mean:.2f}, min {d.best.min:.2f}")
    print(f"\nwrote {config_path} (scores: {d.scores_path}); serve with it:")
    print(serve_command(args.model, config_path, d.max_model_len))
    if args.server_args:
        print(f"(measured with --server-args {shlex.quote(args.server_args)})")
    empty = [s.name for s in d.ranked if not s.error and None in s.cells.values()]
    if empty:
        _say(
            f"warning: {', '.join(empty)}: a length with no answered sample counts 0 "
            "(prompts longer than --max-model-len? see the eval table's notes)"
        )
    failed = [s.name for s in d.ranked if s.error]
    if failed:
        _say(f"not evaluated: {', '.join(failed)}; the config is the best of the others")
    return 2 if failed or code else 0


if __name__ == "__main__":
    sys.exit(main())
