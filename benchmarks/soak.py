"""Soak test of a real Mesa server (`mesa-vllm serve`): concurrent clients, prompts from short
to 8x the trained length L, a KV cache small enough to force preemption, faults and bad input.
Loopback only, bounded in time and in request count; it stops by itself.

    python benchmarks/soak.py --duration 60 --clients 8                  # CPU, toy model
    python benchmarks/soak.py --model DIR --max-model-len 65536 --clients 64 --duration 300 \\
        --server-args "--kv-cache-memory-bytes 1536M --max-num-seqs 64" --out DIR   # GPU

Workload: each client loops over request kinds (weights in KINDS): plain, streaming and
aborted-mid-stream completions, ``n = 2`` sampling, stop strings, chat (plain and streaming),
bad requests (the cases of tests/e2e/test_server.py: they must get HTTP 4xx).  Greedy requests
ask for ``logprobs = 2`` and token ids.  Prompts (token ids) come from a pool of lengths
between 100 tokens and 8 L (``default_lengths``).  Fault phases at fixed fractions of the
load: a client opens ``--drop-streams`` streams and drops them all at once; a request at
exactly max-model-len (and one token over: 4xx); a burst of ``--burst`` requests at once (the
queue fills); SIGTERM to the server during the load (``--shutdown-timeout`` drains), then a
restart on which the load goes on.

Every request has exactly one outcome (OUTCOMES); failures are FAILURES.  A request that
got HTTP 200 and then ended short without an error (no finish reason, fewer tokens than asked
with ignore_eos, no [DONE]) is *truncated*: an accepted request lost silently.

Correctness: after the load every distinct greedy request that completed is run alone on the
idle server; every completed occurrence must give the same greedy tokens, or first differ at
a step where the alone run's top-2 logprob gap is <= ``--tie-tol`` (default TIE_TOL,
benchmarks/real_model/gpu_check.py's near-tie tolerance).  Counts: identical / near-tie /
real divergence, and per distinct request the gaps at its first differences.  A bf16 engine
computes bf16 logits, so its logprob gaps come in bf16 steps of the logit: 1/16 for logits
in [8, 16), 1/8 in [16, 32), 1/4 in [32, 64) (SmolLM2-135M's top logits lie between 7.5 and
36).  Under load each of the two top logits may round one step either way (the batch
decides the summation order of the GEMMs and the decode splits), so their gap may move by
two steps: a bf16 run states its tolerance in those steps (``--tie-tol 0.25``: two steps of a
logit in [16, 32), one step of a logit in [32, 64)).

Also recorded: preemptions (vLLM's ``vllm:num_preemptions`` counter, summed over the two server
lives), requests left running or waiting after the load (must be 0), GPU memory (nvidia-smi)
and the server's resident memory before and after, latency p50/p99 per kind.  Writes
soak.json and table.md to --out; exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
TRAIN_LEN = 64
MESA = {
    "train_len": TRAIN_LEN,
    "first_chunk": 8,
    "last_chunk": 24,
    "max_remainder": 10,
    "stair_width": 4,
}
SERVED = "soak"
# request kinds of the steady load and their weights
KINDS = {"plain": 3, "stream": 2, "abort": 2, "n2": 1, "stop": 1, "chat": 1, "chat_stream": 1,
         "bad": 1}  # fmt: skip
OK_OUTCOMES = ("ok", "aborted", "rejected_4xx", "refused_restart", "cut_shutdown")
FAILURES = ("error", "truncated", "timeout", "bad_accepted", "wrong_status")
OUTCOMES = OK_OUTCOMES + FAILURES
STOP = ["e"]
WORDS = ("river stone light garden window paper music winter orange silver forest number "
         "letter table voice summer market bridge island cloud").split()  # fmt: skip


def _load_tie_tol() -> float:
    spec = importlib.util.spec_from_file_location("gpu_check", HERE / "real_model" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return float(mod.TIE_TOL)


TIE_TOL = _load_tie_tol()


def server_args(kv_blocks: int, max_num_seqs: int = 16, max_model_len: int = 1024) -> list[str]:
    """Flags of the CPU soak server: Mesa, a small float32 engine, a KV cache of
    ``kv_blocks`` blocks of 16 tokens (small enough to force preemption)."""
    return [
        "--attention-backend", "mesa", "--additional-config", json.dumps({"mesa": MESA}),
        "--max-model-len", str(max_model_len), "--dtype", "float32", "--enforce-eager",
        "--gpu-memory-utilization", "0.12", "--block-size", "16",
        "--num-gpu-blocks-override", str(kv_blocks), "--max-num-seqs", str(max_num_seqs),
    ]  # fmt: skip


def default_lengths(train_len: int, max_model_len: int, max_tokens: int) -> list[int]:
    """Prompt lengths of the pool: 100 tokens, inside L, just past L, and up to 8 L."""
    top = min(8 * train_len, max_model_len) - max_tokens
    L = train_len
    cands = [100, L // 8, L // 2, L - 8, L + 100, 2 * L, 3 * L, 4 * L, 6 * L, top]
    return sorted({min(max(c, 4), top) for c in cands})


def _prompts(n: int, seed: int, lengths: list[int] | None = None, vocab=(3, 450)):
    rng = random.Random(seed)
    lengths = lengths or [rng.choice([12, 40, 63, 100, 300, 700]) for _ in range(n)]
    return [[vocab[0]] + [rng.randrange(*vocab) for _ in range(t - 1)] for t in lengths]


def _rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def gpu_memory_mib() -> float | None:
    """Used memory of all GPUs (nvidia-smi), MiB; None when there is no nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        return float(sum(float(x) for x in out.split()))
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def scrape(base_url: str) -> dict[str, float]:
    """vLLM's counters of interest from /metrics (summed over label sets)."""
    root = base_url.removesuffix("/v1")
    text = urllib.request.urlopen(root + "/metrics", timeout=10).read().decode()
    out = {}
    for key, name in (("preemptions", "vllm:num_preemptions_total"),
                      ("running", "vllm:num_requests_running"),
                      ("waiting", "vllm:num_requests_waiting")):  # fmt: skip
        vals = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, flags=re.M)
        out[key] = sum(float(v) for v in vals)
    return out


def _preemptions(base_url: str) -> float:
    return scrape(base_url)["preemptions"]


def bad_requests(model: str, max_model_len: int) -> dict[str, bytes]:
    """Bodies of bad /v1/completions requests (tests/e2e/test_server.py's cases)."""
    return {
        "too long": json.dumps({"model": model, "prompt": [5] * (max_model_len + 10),
                                "max_tokens": 4}).encode(),
        "empty prompt": json.dumps({"model": model, "prompt": "", "max_tokens": 4}).encode(),
        "max_tokens too big": json.dumps({"model": model, "prompt": "hi",
                                          "max_tokens": max_model_len * 4}).encode(),
        "negative max_tokens": json.dumps({"model": model, "prompt": "hi",
                                           "max_tokens": -1}).encode(),
        "malformed JSON": b'{"model": "' + model.encode() + b'", "prompt": "hi", ',
        "non-UTF-8": b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xfa"}',
        "unknown model": json.dumps({"model": "nope", "prompt": "hi"}).encode(),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# one HTTP request


class Truncated(Exception):
    """HTTP 200, then the answer ended short without an error."""


class StreamError(Exception):
    """An error event inside a stream (the server reported the failure)."""


@dataclass
class Answer:
    tokens: list = field(default_factory=list)  # greedy token ids of choice 0
    tops: list = field(default_factory=list)  # per step: the two best logprobs
    finish: list = field(default_factory=list)  # finish reason per choice
    completion_tokens: int | None = None


def _tok(t: str) -> int | str:
    return int(t.split(":", 1)[1]) if t.startswith("token_id:") else t


def _top2(d: dict) -> list[float]:
    return sorted(d.values(), reverse=True)[:2]


def _add_choice(ans: Answer, ch: dict, chat: bool) -> None:
    lp = ch.get("logprobs")
    if lp and ch.get("index", 0) == 0:
        if chat:
            for e in lp.get("content") or []:
                ans.tokens.append(_tok(e["token"]))
                ans.tops.append(_top2({t["token"]: t["logprob"] for t in e["top_logprobs"]}))
        else:
            ans.tokens += [_tok(t) for t in lp["tokens"]]
            ans.tops += [_top2(d) for d in lp["top_logprobs"]]


def call(host: str, port: int, path: str, body: bytes, stream: bool, state: dict,
         timeout: float, abort_after: int | None = None) -> tuple[int, Answer | None]:  # fmt: skip
    """POST ``body``; (status, parsed answer or None for non-200).  ``state['accepted']`` is
    set once HTTP 200 headers came.  ``abort_after``: close the stream after that many events.
    Raises Truncated / StreamError / OSError / http.client errors."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1" + path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return resp.status, None
        state["accepted"] = True
        chat = path.startswith("/chat")
        ans = Answer()
        if not stream:
            obj = json.loads(resp.read())
            for ch in obj["choices"]:
                _add_choice(ans, ch, chat)
                ans.finish.append(ch.get("finish_reason"))
            ans.completion_tokens = (obj.get("usage") or {}).get("completion_tokens")
            return 200, ans
        events, done, finish = 0, False, {}
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                raise StreamError(str(obj["error"])[:200])
            for ch in obj.get("choices") or []:
                _add_choice(ans, ch, chat)
                if ch.get("finish_reason"):
                    finish[ch.get("index", 0)] = ch["finish_reason"]
            events += 1
            if abort_after is not None and events >= abort_after:
                return 200, None  # closed below: the server sees the client go away
        if not done:
            raise Truncated(f"stream ended without [DONE] after {events} events")
        ans.finish = [finish.get(i) for i in range(max(finish, default=0) + 1)]
        return 200, ans
    finally:
        if conn.sock is not None:
            try:
                conn.sock.shutdown(2)
            except OSError:
                pass
        conn.close()


# ---------------------------------------------------------------------------------------------
# the soak


@dataclass
class Config:
    model: str  # model directory, or None: the CPU toy model
    clients: int = 8
    duration: float = 60.0
    max_requests: int = 100_000
    max_tokens: int = 16
    train_len: int = TRAIN_LEN
    max_model_len: int = 1024
    vocab: tuple[int, int] = (3, 450)
    lengths: list[int] | None = None
    drop_streams: int = 200
    burst: int = 48
    restart: bool = True
    shutdown_timeout: int = 10
    request_timeout: float = 300.0
    start_timeout: float = 600.0
    end_by: float | None = None  # wall-clock (time.time) end of the whole run
    seed: int = 0
    tie_tol: float = TIE_TOL
    out: Path = Path("out/soak")
    launch: tuple[list[str], dict] = field(default_factory=lambda: ([], {}))


class Soak:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        c = cfg
        self.lengths = c.lengths or default_lengths(c.train_len, c.max_model_len, c.max_tokens)
        self.prompts = _prompts(len(self.lengths), c.seed, self.lengths, c.vocab)
        rng = random.Random(c.seed + 1)
        self.chats = [" ".join(rng.choice(WORDS) for _ in range(n))
                      for n in sorted({10, max(c.train_len // 4, 11), c.train_len})]  # fmt: skip
        self.bad = bad_requests(SERVED, c.max_model_len)
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()  # (kind, outcome) -> n
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.greedy: dict[tuple, list[Answer]] = defaultdict(list)
        self.bodies: dict[tuple, tuple[str, dict]] = {}
        self.issued = 0
        self.failures_at_sigterm = 0  # of the requests in flight when SIGTERM came
        self.epoch = 0  # bumped at SIGTERM
        self.down = False
        self.up = threading.Event()
        self.up.set()
        self.window = [None, None]  # SIGTERM .. healthy again (monotonic)
        self.port = 0
        self.server = None
        self.stop_load = threading.Event()
        self.metrics_last: list[dict] = [{}]  # per server life
        self.peak = {"running": 0.0, "waiting": 0.0}
        self.phases: dict[str, Any] = {}

    # -- requests ---------------------------------------------------------------------------

    def request(self, kind: str, rng: random.Random) -> tuple[str, dict | bytes, bool, tuple]:
        """(path, body, stream, greedy key or ()) of one request of ``kind``."""
        mt = self.cfg.max_tokens
        greedy = {"temperature": 0, "max_tokens": mt, "ignore_eos": True,
                  "return_tokens_as_token_ids": True}  # fmt: skip
        if kind == "bad":
            name = rng.choice(sorted(self.bad))
            return "/completions", self.bad[name], False, ("bad", name)
        if kind in ("chat", "chat_stream"):
            j = rng.randrange(len(self.chats))
            body = {"model": SERVED, "messages": [{"role": "user", "content": self.chats[j]}],
                    "logprobs": True, "top_logprobs": 2, **greedy}  # fmt: skip
            if kind == "chat_stream":
                body["stream"] = True
            return "/chat/completions", body, kind == "chat_stream", ("chat", j)
        i = rng.randrange(len(self.prompts))
        body = {"model": SERVED, "prompt": self.prompts[i], "logprobs": 2, **greedy}
        if kind == "n2":
            body = {
                "model": SERVED,
                "prompt": self.prompts[i],
                "max_tokens": mt,
                "n": 2,
                "temperature": 0.8,
                "seed": rng.randrange(1 << 30),
                "ignore_eos": True,
            }
            return "/completions", body, False, ()
        if kind == "stop":
            return "/completions", {**body, "stop": STOP}, False, ("stop", i)
        if kind in ("stream", "abort"):
            return "/completions", {**body, "stream": True}, True, ("cmpl", i)
        return "/completions", body, False, ("cmpl", i)

    def run_one(self, kind: str, path: str, body, stream: bool, key: tuple,
                abort_after: int | None = None, expect_4xx: bool = False) -> str:  # fmt: skip
        """Send one request, record its one outcome; returns the outcome."""
        c = self.cfg
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self.lock:
            self.issued += 1
            epoch, port, sent_down = self.epoch, self.port, self.down
        st: dict = {"accepted": False}
        t0 = time.monotonic()
        detail = ""
        try:
            status, ans = call("127.0.0.1", port, path, raw, stream, st, c.request_timeout,
                               abort_after)  # fmt: skip
            if status != 200:
                if 400 <= status < 500:
                    outcome = "rejected_4xx" if expect_4xx else "wrong_status"
                elif self._shutdown_related(epoch):
                    outcome = "refused_restart"
                else:
                    outcome = "error"
                detail = f"HTTP {status}"
            elif expect_4xx:
                outcome, detail = "bad_accepted", f"{key}"
            elif ans is None:
                outcome = "aborted"
            else:
                outcome, detail = self._check(kind, body, ans, epoch, sent_down)
                if outcome == "ok" and key:
                    with self.lock:
                        self.greedy[key].append(ans)
                        self.bodies.setdefault(key, (path, body))
        except Truncated as exc:
            outcome, detail = "truncated", str(exc)
        except TimeoutError as exc:
            outcome, detail = "timeout", str(exc)
        except Exception as exc:  # connection refused / reset, error events
            detail = f"{type(exc).__name__}: {exc}"
            if not self._shutdown_related(epoch):
                outcome = "error"
            else:
                cut = st["accepted"] and epoch != self.epoch  # in flight at SIGTERM
                outcome = "cut_shutdown" if cut else "refused_restart"
        dt = time.monotonic() - t0
        if outcome in FAILURES and epoch != self.epoch:
            detail = f"in flight at SIGTERM: {detail}"
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            if outcome in FAILURES and epoch != self.epoch:
                self.failures_at_sigterm += 1
            if outcome == "ok":
                self.latency[kind].append(dt)
            if outcome in FAILURES or outcome == "cut_shutdown":
                if len(self.examples[outcome]) < 20:
                    self.examples[outcome].append(f"{kind} {key} {len(raw)} B: {detail}"[:300])
        if outcome == "refused_restart":  # the server is down: wait for the new one
            self.up.wait(timeout=self.cfg.start_timeout + 120)
        return outcome

    def _shutdown_related(self, epoch: int) -> bool:
        return self.down or epoch != self.epoch

    def _check(self, kind: str, body: dict, ans: Answer, epoch: int,
               sent_down: bool = False) -> tuple[str, str]:  # fmt: skip
        n = body.get("n", 1)
        if len(ans.finish) != n or any(f is None for f in ans.finish):
            if sent_down or epoch != self.epoch:
                # reached the engine after its drain began (sent after SIGTERM, or sent just
                # before it and still on its way through the API server): vLLM 0.26 aborts
                # it and drops the abort chunk of a stream with no new token (README,
                # "Reliability"): the client sees [DONE] and no finish reason
                when = "sent after SIGTERM" if sent_down else "in flight at SIGTERM"
                return "cut_shutdown", f"{when}, finish reasons {ans.finish}"
            return "truncated", f"finish reasons {ans.finish} (n={n})"
        if "abort" in ans.finish:
            if not self._shutdown_related(epoch):
                return "error", "finish reason abort"
            # sent after SIGTERM: vLLM's draining engine refuses new requests this way
            if epoch != self.epoch:
                return "cut_shutdown", "in flight at SIGTERM, aborted"
            return "refused_restart", "sent after SIGTERM: HTTP 200, finish reason abort"
        want = body["max_tokens"]
        if "stop" in body:
            if len(ans.tokens) > want:
                return "truncated", f"{len(ans.tokens)} tokens > {want}"
        elif n > 1:
            if ans.completion_tokens != n * want:
                return "truncated", f"{ans.completion_tokens} tokens, want {n * want}"
        elif len(ans.tokens) != want:
            return "truncated", f"{len(ans.tokens)} tokens, want {want} (ignore_eos)"
        return "ok", ""

    # -- clients and phases -----------------------------------------------------------------

    def worker(self, wid: int, deadline: float) -> None:
        rng = random.Random(self.cfg.seed * 1000 + wid)
        kinds, weights = zip(*KINDS.items(), strict=True)
        while time.monotonic() < deadline and not self.stop_load.is_set():
            with self.lock:
                if self.issued >= self.cfg.max_requests:
                    return
            kind = rng.choices(kinds, weights)[0]
            path, body, stream, key = self.request(kind, rng)
            self.run_one(kind, path, body, stream, key,
                         abort_after=3 if kind == "abort" else None,
                         expect_4xx=kind == "bad")  # fmt: skip

    def _parallel(self, n: int, fn) -> None:
        """Run ``fn(i, barrier)`` in n threads that pass one barrier together."""
        barrier = threading.Barrier(n)
        ts = [threading.Thread(target=fn, args=(i, barrier), daemon=True) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=self.cfg.request_timeout + 60)

    def phase_drop(self) -> dict:
        """Open ``drop_streams`` streams, wait until all have their headers, close them all."""
        n, t0 = self.cfg.drop_streams, time.monotonic()
        body = json.dumps(
            {
                "model": SERVED,
                "prompt": self.prompts[0],
                "stream": True,
                "max_tokens": 4 * self.cfg.max_tokens,
                "ignore_eos": True,
            }
        ).encode()
        got = Counter()
        with self.lock:
            self.issued += n
            port = self.port

        def one(i: int, barrier: threading.Barrier) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            outcome = "error"
            try:
                conn.request("POST", "/v1/completions", body=body,
                             headers={"Content-Type": "application/json"})  # fmt: skip
                status = conn.getresponse().status
                outcome = "aborted" if status == 200 else "wrong_status"
            except Exception as exc:
                with self.lock:
                    if len(self.examples["error"]) < 20:
                        self.examples["error"].append(f"drop: {type(exc).__name__}: {exc}")
            finally:
                try:
                    barrier.wait(timeout=120)
                except threading.BrokenBarrierError:
                    pass
                if conn.sock is not None:
                    conn.sock.close()  # all at once
                conn.close()
                with self.lock:
                    got[outcome] += 1
                    self.outcomes[("drop", outcome)] += 1

        self._parallel(n, one)
        return {"streams": n, "opened": got["aborted"], "seconds": round(time.monotonic() - t0, 1)}

    def phase_max_len(self) -> dict:
        """A request of exactly max-model-len tokens (prompt + max_tokens); one over: 4xx."""
        c, mt = self.cfg, 4
        rng = random.Random(7)
        res = {}
        for name, plen in (("max_len_exact", c.max_model_len - mt),
                           ("max_len_over", c.max_model_len - mt + 1)):  # fmt: skip
            prompt = [c.vocab[0]] + [rng.randrange(*c.vocab) for _ in range(plen - 1)]
            body = {
                "model": SERVED,
                "prompt": prompt,
                "max_tokens": mt,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 1,
                "return_tokens_as_token_ids": True,
            }
            t0 = time.monotonic()
            out = self.run_one(name, "/completions", body, False, (),
                               expect_4xx=name == "max_len_over")  # fmt: skip
            res[name] = {"prompt_tokens": plen, "outcome": out,
                         "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
        return res

    def phase_burst(self) -> dict:
        """``burst`` greedy requests at once (short prompts): the scheduler's queue fills."""
        t0 = time.monotonic()
        res = Counter()

        def one(i: int, barrier: threading.Barrier) -> None:
            rng = random.Random(10_000 + i)
            path, body, stream, key = self.request("plain", rng)
            j = i % min(3, len(self.prompts))  # the three shortest prompts
            body = {**body, "prompt": self.prompts[j]}
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                pass
            res[self.run_one("burst", path, body, False, ("cmpl", j))] += 1

        self._parallel(self.cfg.burst, one)
        return {"requests": self.cfg.burst, "outcomes": dict(res),
                "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip

    def phase_sigterm(self) -> dict:
        """SIGTERM the server process (as `docker stop` would) under load; wait for it to
        exit; start it again; the load goes on against the new server."""
        srv = self.server
        res: dict[str, Any] = {}
        with self.lock:
            self.window[0] = time.monotonic()
            self.down = True
            self.up.clear()
            self.epoch += 1
        try:
            self.metrics_last[-1] = scrape(srv.base_url)
        except OSError:
            pass
        pid = srv.proc.pid
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        grace = self.cfg.shutdown_timeout + 60
        try:
            code = srv.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        res["exit_code"] = code
        res["exit_seconds"] = round(time.monotonic() - t0, 1)
        left = _group(pid)
        for _ in range(20):  # the engine core may exit a moment after the API server
            if not left:
                break
            time.sleep(0.5)
            left = _group(pid)
        res["processes_left"] = left
        srv.stop()  # kills what is left, releases the port
        res["gpu_mib_after_exit"] = gpu_memory_mib()
        t1 = time.monotonic()
        self.server = self._new_server(2)
        try:
            self.server.start()
        except Exception:
            self.up.set()  # the clients then fail against the dead port: counted as errors
            raise
        res["restart_seconds"] = round(time.monotonic() - t1, 1)
        res["healthy_after_restart"] = _health(self.server.base_url)
        self.metrics_last.append({})
        with self.lock:
            self.port = self.server.port
            self.down = False
            self.window[1] = time.monotonic()
        self.up.set()
        res["clean"] = code == 0 and not left
        return res

    def _new_server(self, life: int):
        args, env = self.cfg.launch
        log = self.cfg.out / f"server-{life}.log"
        return _server(self.cfg.model, args, env, log, self.cfg.start_timeout)

    def monitor(self) -> None:
        while not self.stop_load.wait(5.0):
            if self.down:
                continue
            try:
                m = scrape(self.server.base_url)
            except OSError:
                continue
            with self.lock:
                if not self.down:
                    self.metrics_last[-1] = m
                    for k in self.peak:
                        self.peak[k] = max(self.peak[k], m[k])

    # -- correctness ------------------------------------------------------------------------

    def references(self, end_by: float) -> dict:
        """Run every distinct completed greedy request alone; compare every occurrence."""
        counts = Counter()
        details = []
        by_request: dict[str, dict] = {}  # key -> verdict counts and first-difference gaps
        for key in sorted(self.greedy, key=str):
            path, body = self.bodies[key]
            occ = self.greedy[key]
            if time.time() > end_by:
                counts["not_rerun"] += len(occ)
                continue
            body = {k: v for k, v in body.items() if k != "stream"}
            st: dict = {}
            try:
                status, ref = call("127.0.0.1", self.port, path, json.dumps(body).encode(),
                                   False, st, self.cfg.request_timeout)  # fmt: skip
            except Exception as exc:
                status, ref = f"{type(exc).__name__}: {exc}", None
            if status != 200 or ref is None:
                counts["reference_failed"] += len(occ)
                details.append({"key": str(key), "reference": str(status)})
                continue
            for a in occ:
                verdict, info = compare(a, ref, self.cfg.tie_tol)
                counts[verdict] += 1
                if verdict == "identical":
                    continue
                if len(details) < 50:
                    details.append({"key": str(key), "verdict": verdict, **info})
                row = by_request.setdefault(str(key), {"occurrences": len(occ), "gaps": {}})
                row[verdict] = row.get(verdict, 0) + 1
                gap = str(info["top2_gap"])
                row["gaps"][gap] = row["gaps"].get(gap, 0) + 1
        return {"tie_tol": self.cfg.tie_tol, "requests": sum(len(v) for v in self.greedy.values()),
                "distinct": len(self.greedy), **{k: counts[k] for k in
                ("identical", "near_tie", "real", "not_rerun", "reference_failed")},
                "diverging_requests": by_request, "details": details}  # fmt: skip

    # -- the whole run ----------------------------------------------------------------------

    def run(self) -> dict:
        c = self.cfg
        c.out.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        end_by = c.end_by or t_start + 10 * c.duration + 1200
        gpu0 = gpu_memory_mib()
        self.server = self._new_server(1)
        self.server.start()
        self.port = self.server.port
        start_s = round(time.time() - t_start, 1)
        rss0, gpu1 = _rss_mb(self.server.proc.pid), gpu_memory_mib()
        print(f"server up in {start_s} s; soaking {c.clients} clients for {c.duration:.0f} s "
              f"(prompts {min(self.lengths)}..{max(self.lengths)} tokens)", flush=True)  # fmt: skip
        t0 = time.monotonic()
        # the load ends after `duration` loaded seconds (the restart's downtime added), or
        # early enough that the references and the shutdown fit before end_by
        reserve = 30 + 2 * len(self.prompts) + len(self.chats)
        deadline = [t0 + min(c.duration, end_by - time.time() - reserve)]
        threads = [threading.Thread(target=self._worker_loop, args=(w, deadline), daemon=True)
                   for w in range(c.clients)]  # fmt: skip
        mon = threading.Thread(target=self.monitor, daemon=True)
        for t in (*threads, mon):
            t.start()
        plan = [(0.15, "drop", self.phase_drop), (0.3, "max_len", self.phase_max_len),
                (0.45, "burst", self.phase_burst)]  # fmt: skip
        if c.restart:
            plan.append((0.6, "sigterm", self.phase_sigterm))
        for frac, name, fn in plan:
            wait = t0 + frac * c.duration - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if time.monotonic() >= deadline[0]:
                self.phases[name] = "skipped: no time left"
                continue
            tp = time.monotonic()
            try:
                self.phases[name] = fn()
            except Exception as exc:
                self.phases[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"phase {name}: {self.phases[name]}", flush=True)
            if name == "sigterm":  # downtime does not count as loaded time
                latest = time.monotonic() + end_by - reserve - time.time()
                deadline[0] = min(deadline[0] + time.monotonic() - tp, latest)
        # the clients' last requests finish; a client still waiting past that (or too close
        # to end_by to check anything) counts as hung, its request as lost
        last = min(deadline[0] + c.request_timeout + 30,
                   time.monotonic() + end_by - time.time() - reserve / 2)  # fmt: skip
        for t in threads:
            t.join(timeout=max(last - time.monotonic(), 1))
        self.stop_load.set()
        lost_threads = sum(t.is_alive() for t in threads)
        load_s = time.monotonic() - t0
        downtime = (self.window[1] - self.window[0]) if self.window[1] else 0.0
        # nothing may be left in the scheduler once every client has its answer
        leftover = {}
        for _ in range(30):
            try:
                leftover = scrape(self.server.base_url)
            except OSError as exc:
                leftover = {"error": str(exc)}
                break
            if leftover["running"] == 0 and leftover["waiting"] == 0:
                break
            time.sleep(1)
        self.metrics_last[-1] = {**self.metrics_last[-1], **leftover}
        rss1, gpu2 = _rss_mb(self.server.proc.pid), gpu_memory_mib()
        healthy = _health(self.server.base_url)
        print("load done; running every distinct greedy request alone", flush=True)
        corr = self.references(end_by - 15)
        summary = self.summary(start_s, load_s, downtime, lost_threads, leftover, healthy,
                               corr, rss0, rss1, gpu0, gpu1, gpu2)  # fmt: skip
        write(summary, c.out)  # before the server's stop, which may take a while
        self.server.stop()
        return summary

    def _worker_loop(self, wid: int, deadline: list[float]) -> None:
        while True:  # the deadline moves once (the restart's downtime)
            self.worker(wid, deadline[0])
            time.sleep(0.5)
            if time.monotonic() >= deadline[0] or self.stop_load.is_set():
                return
            with self.lock:
                if self.issued >= self.cfg.max_requests:
                    return

    def summary(self, start_s, load_s, downtime, lost_threads, leftover, healthy, corr,
                rss0, rss1, gpu0, gpu1, gpu2) -> dict:  # fmt: skip
        by_outcome = Counter()
        by_kind: dict[str, dict[str, int]] = defaultdict(dict)
        for (kind, outcome), n in sorted(self.outcomes.items()):
            by_outcome[outcome] += n
            by_kind[kind][outcome] = n
        recorded = sum(by_outcome.values())
        lat_all = sorted(x for v in self.latency.values() for x in v)
        preempt = sum(m.get("preemptions", 0.0) for m in self.metrics_last)
        failures = sum(by_outcome[f] for f in FAILURES) + corr["real"] + corr["reference_failed"]
        lost = self.issued - recorded
        sig = self.phases.get("sigterm")
        problems = []
        if failures:
            problems.append(f"{failures} failures")
        if lost or lost_threads:
            problems.append(f"{lost} requests without an outcome ({lost_threads} clients hung)")
        if not healthy:
            problems.append("/health not 200 after the load")
        if leftover.get("running", 1) or leftover.get("waiting", 1):
            problems.append(f"requests left in the scheduler: {leftover}")
        if self.cfg.restart and not (isinstance(sig, dict) and sig.get("healthy_after_restart")):
            problems.append(f"restart after SIGTERM failed: {sig}")
        for name in ("drop", "max_len", "burst"):
            if not isinstance(self.phases.get(name), dict) or "error" in self.phases[name]:
                problems.append(f"phase {name}: {self.phases.get(name)}")
        ml = self.phases.get("max_len")
        if isinstance(ml, dict) and "max_len_exact" in ml:
            if ml["max_len_exact"]["outcome"] != "ok":
                problems.append(f"request at exactly max-model-len: {ml['max_len_exact']}")
        return {
            "model": self.cfg.model, "clients": self.cfg.clients,
            "duration_s": round(load_s, 1), "loaded_s": round(load_s - downtime, 1),
            "server_start_s": start_s, "max_model_len": self.cfg.max_model_len,
            "train_len": self.cfg.train_len, "prompt_lengths": self.lengths,
            "max_tokens": self.cfg.max_tokens,
            "requests": self.issued, "recorded": recorded, "lost": lost,
            "outcomes": dict(by_outcome), "by_kind": by_kind,
            "failures": failures, "failures_in_flight_at_sigterm": self.failures_at_sigterm,
            "examples": dict(self.examples),
            "latency_s": {"p50": _pct(lat_all, 50), "p99": _pct(lat_all, 99),
                          **{k: {"p50": _pct(sorted(v), 50), "p99": _pct(sorted(v), 99)}
                             for k, v in sorted(self.latency.items())}},
            "preemptions": preempt, "peak_running": self.peak["running"],
            "peak_waiting": self.peak["waiting"], "left_in_scheduler": leftover,
            "phases": self.phases, "correctness": corr, "healthy_after": healthy,
            "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss1, 1),
            "gpu_mib": {"idle": gpu0, "before": gpu1, "after": gpu2,
                        "note": None if gpu1 is not None else "no nvidia-smi: not measured"},
            "problems": problems, "pass": not problems,
        }  # fmt: skip


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 3)


def _group(pgid: int) -> list[str]:
    """The live (not zombie) processes of process group ``pgid``, as 'pid name'."""
    out = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.info['name']}")
        except OSError:
            continue
    return out


def _health(base_url: str) -> bool:
    try:
        return (
            urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10).status
            == 200
        )
    except OSError:
        return False


def _server(model: str, args: list[str], env: dict, log: Path, timeout: float):
    """A `mesa-vllm serve` server (benchmarks/serve_load.py's LocalServer subclass)."""
    import serve_load

    srv = serve_load.mesa_serve_server(model, args, env, log, timeout)
    srv.served_name = SERVED
    return srv


def compare(a: Answer, ref: Answer, tie_tol: float = TIE_TOL) -> tuple[str, dict]:
    """identical / near_tie (first difference where the alone run's top-2 gap <= tie_tol)
    / real."""
    if a.tokens == ref.tokens:
        return "identical", {}
    k = next((i for i, (x, y) in enumerate(zip(a.tokens, ref.tokens, strict=False)) if x != y),
             min(len(a.tokens), len(ref.tokens)))  # fmt: skip
    tops = ref.tops[k] if k < len(ref.tops) else (a.tops[k] if k < len(a.tops) else [])
    gap = tops[0] - tops[1] if len(tops) >= 2 else None
    verdict = "near_tie" if gap is not None and gap <= tie_tol else "real"
    return verdict, {"first_difference": k, "top2_gap": gap}


def diverging_lines(c: dict) -> list[str]:
    """The distinct requests whose re-runs differed: verdict counts and the top-2 gaps at the
    first differences ({gap: occurrences})."""
    rows = c.get("diverging_requests") or {}
    if not rows:
        return []
    out = ["| diverging request | occurrences | near-tie | real | top-2 gap at the first "
           "difference: occurrences |", "|---|---|---|---|---|"]  # fmt: skip
    for key, r in sorted(rows.items()):
        gaps = ", ".join(f"{g}: {n}" for g, n in sorted(r["gaps"].items()))
        out.append(f"| {key} | {r['occurrences']} | {r.get('near_tie', 0)} | "
                   f"{r.get('real', 0)} | {gaps} |")  # fmt: skip
    return [*out, ""]


def table(s: dict) -> str:
    """The markdown summary of a soak result."""
    o, c, sig = s["outcomes"], s["correctness"], s["phases"].get("sigterm")
    lat = s["latency_s"]
    gm = s["gpu_mib"]
    gpu = (
        "n/a (no nvidia-smi)"
        if gm["before"] is None
        else f"{gm['before']:.0f} → {gm['after']:.0f} MiB"
    )
    restart = "-"
    if isinstance(sig, dict) and "exit_code" in sig:
        restart = (
            f"exit {sig['exit_code']} in {sig['exit_seconds']} s, "
            f"{len(sig['processes_left'])} processes left, up again in {sig['restart_seconds']} s"
        )
    rows = [
        "| requests | clients | loaded s | ok | aborted | 4xx (bad input) | refused / cut at "
        "SIGTERM | failures | lost | preemptions | latency p50 / p99 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['clients']} | {s['loaded_s']} | {o.get('ok', 0)} | "
        f"{o.get('aborted', 0)} | {o.get('rejected_4xx', 0)} | {o.get('refused_restart', 0)} / "
        f"{o.get('cut_shutdown', 0)} | **{s['failures']}** | **{s['lost']}** | "
        f"{s['preemptions']:.0f} | {lat['p50']} / {lat['p99']} |",
        "",
        f"| greedy re-run alone | identical | near-tie (gap ≤ {c['tie_tol']}) | real divergence "
        "| not re-run |",
        "|---|---|---|---|---|",
        f"| {c['requests']} ({c['distinct']} distinct) | {c['identical']} | {c['near_tie']} | "
        f"**{c['real']}** | {c['not_rerun']} |",
        "",
        *diverging_lines(c),
        f"GPU memory before → after: {gpu}; server RSS {s['rss_mb_before']} → "
        f"{s['rss_mb_after']} MB; SIGTERM: {restart}; left in the scheduler after the load: "
        f"{s['left_in_scheduler']}; /health after: {s['healthy_after']}.",
        "",
        "| kind | " + " | ".join(OUTCOMES) + " |",
        "|---|" + "---|" * len(OUTCOMES),
    ]  # fmt: skip
    for kind, d in sorted(s["by_kind"].items()):
        rows.append(f"| {kind} | " + " | ".join(str(d.get(x, 0)) for x in OUTCOMES) + " |")
    if s["problems"]:
        rows += ["", "Problems: " + "; ".join(s["problems"])]
    return "\n".join(rows) + "\n"


def write(summary: dict, out: Path) -> None:
    """soak.json and table.md in ``out``."""
    (out / "soak.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "table.md").write_text(table(summary))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=None, help="default: a random tiny Llama (CPU)")
    ap.add_argument("--duration", type=float, default=60, help="loaded seconds")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default: toy (kv-blocks - 1) x 16, else 8 L",
    )
    ap.add_argument("--kv-blocks", type=int, default=64, help="toy: KV blocks of 16 tokens")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="toy model only")
    ap.add_argument("--server-args", default="", help="extra server flags (a shell string)")
    ap.add_argument("--mesa-config", type=json.loads, default={}, help="--model: Mesa JSON")
    ap.add_argument("--drop-streams", type=int, default=200)
    ap.add_argument("--burst", type=int, default=None, help="default: 3x --clients")
    ap.add_argument("--no-restart", action="store_true", help="skip the SIGTERM phase")
    ap.add_argument("--shutdown-timeout", type=int, default=10, help="server drain seconds")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--end-by", type=float, default=None, help="epoch seconds: all done by then")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tie-tol",
        type=float,
        default=TIE_TOL,
        help="near-tie: top-2 logprob gap at the first difference (bf16: 0.125)",
    )
    ap.add_argument("--out", type=Path, default=Path("out/soak"))
    args = ap.parse_args(argv)

    extra = [*shlex.split(args.server_args), "--shutdown-timeout", str(args.shutdown_timeout)]
    if args.model is None:
        from mesa_vllm.testing.tiny_models import make_random_model

        model = make_random_model(
            "llama", Path.home() / ".cache" / "mesa_vllm" / "soak-llama-64", train_len=TRAIN_LEN
        )
        # vLLM keeps one KV block aside (the null block): a request of max-model-len tokens
        # must fit in the others, or it waits at the head of the queue forever
        mml = args.max_model_len or (args.kv_blocks - 1) * 16
        launch = ([*server_args(args.kv_blocks, args.max_num_seqs, mml), *extra], {})
        train_len, vocab = TRAIN_LEN, (3, 450)
    else:
        import serve_load

        from mesa_vllm.eval import methods as M

        model = args.model
        cfg = M.read_model_config(str(model))
        train_len = M.trained_length(cfg) or 4096
        mml = args.max_model_len or 8 * train_len
        launch = serve_load.server_launch(
            "mesa", str(model), mml, args.mesa_config, extra, M.is_cpu_install()
        )
        vocab = (100, min(int(cfg.get("vocab_size", 32000)), 49000))
    cfg = Config(
        model=str(model), clients=args.clients, duration=args.duration,
        max_requests=args.max_requests, max_tokens=args.max_tokens, train_len=train_len,
        max_model_len=mml, vocab=vocab, drop_streams=args.drop_streams,
        burst=args.burst or 3 * args.clients, restart=not args.no_restart,
        shutdown_timeout=args.shutdown_timeout, request_timeout=args.request_timeout,
        end_by=args.end_by, seed=args.seed, tie_tol=args.tie_tol, out=args.out, launch=launch,
    )  # fmt: skip
    summary = Soak(cfg).run()
    print(table(summary))
    for kind, lines in summary["examples"].items():
        for line in lines[:5]:
            print(f"  {kind}: {line}")
    print(f"SOAK pass={summary['pass']}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
