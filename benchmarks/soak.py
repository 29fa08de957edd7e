"""Soak test of a real Mesa server: concurrent clients, short and long prompts, streaming and
not, some aborted mid-stream, a KV cache small enough to force preemption.  Loopback only,
bounded in time and in request count; it stops by itself.

    .venv/bin/python benchmarks/soak.py --duration 60 --clients 8 [--model DIR]

Every completed request's greedy output must equal the same request run alone (measured
first, one at a time, on the same server).  Prints requests, concurrency, duration, failures,
preemptions and the server's resident memory before and after; exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

TRAIN_LEN = 64
MESA = {
    "train_len": TRAIN_LEN,
    "first_chunk": 8,
    "last_chunk": 24,
    "max_remainder": 10,
    "stair_width": 4,
}


@dataclass
class Tally:
    completed: int = 0
    aborted: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def server_args(kv_blocks: int, max_num_seqs: int = 16, max_model_len: int = 1024) -> list[str]:
    """Flags of the soak server: Mesa, a small float32 CPU engine, a KV cache of
    ``kv_blocks`` blocks of 16 tokens (small enough to force preemption)."""
    return [
        "--attention-backend", "mesa", "--additional-config", json.dumps({"mesa": MESA}),
        "--max-model-len", str(max_model_len), "--dtype", "float32", "--enforce-eager",
        "--gpu-memory-utilization", "0.12", "--block-size", "16",
        "--num-gpu-blocks-override", str(kv_blocks), "--max-num-seqs", str(max_num_seqs),
    ]  # fmt: skip


def _prompts(n: int, seed: int, lengths: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = lengths or [rng.choice([12, 40, 63, 100, 300, 700]) for _ in range(n)]
    return [[0] + [rng.randrange(3, 450) for _ in range(t - 1)] for t in lengths]


def _rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def _preemptions(base_url: str) -> float:
    root = base_url.removesuffix("/v1")
    text = urllib.request.urlopen(root + "/metrics", timeout=10).read().decode()
    return sum(
        float(m)
        for m in re.findall(r"^vllm:num_preemptions_total\{[^}]*\} (\S+)$", text, flags=re.M)
    )


def run_soak(
    base_url: str,
    model: str,
    duration: float,
    clients: int,
    max_requests: int,
    seed: int = 0,
    max_tokens: int = 16,
    pool: int = 12,
    lengths: list[int] | None = None,
) -> dict:
    """Drive the server; return the summary dict (see module docstring).  ``lengths``: the
    prompt lengths of the pool (default: ``pool`` random picks from 12..700 tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)
    prompts = _prompts(pool, seed, lengths)
    alone = []
    for p in prompts:  # reference: each request alone
        r = client.completions.create(
            model=model,
            prompt=p,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        alone.append(r.choices[0].text)
    tally = Tally()
    deadline = time.monotonic() + duration
    issued = iter(range(max_requests))
    issue_lock = threading.Lock()

    def worker(wid: int) -> None:
        rng = random.Random(seed * 1000 + wid)
        while time.monotonic() < deadline:
            with issue_lock:
                if next(issued, None) is None:
                    return
            i = rng.randrange(len(prompts))
            mode = rng.choice(["plain", "stream", "abort"])
            try:
                if mode == "plain":
                    r = client.completions.create(
                        model=model,
                        prompt=prompts[i],
                        max_tokens=max_tokens,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                    text = r.choices[0].text
                else:
                    stream = client.completions.create(
                        model=model,
                        prompt=prompts[i],
                        max_tokens=max_tokens,
                        temperature=0,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    parts = []
                    for k, chunk in enumerate(stream):
                        if chunk.choices:
                            parts.append(chunk.choices[0].text)
                        if mode == "abort" and k >= 2:
                            stream.close()
                            break
                    if mode == "abort":
                        with tally.lock:
                            tally.aborted += 1
                        continue
                    text = "".join(parts)
                with tally.lock:
                    tally.completed += 1
                    if text != alone[i]:
                        tally.mismatches.append(f"prompt {i} ({len(prompts[i])} tok, {mode})")
            except Exception as exc:  # any error is a failure of the soak
                with tally.lock:
                    tally.errors.append(f"{mode}: {type(exc).__name__}: {exc}"[:300])

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 600)
    elapsed = time.monotonic() - t0
    health = urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10).status
    return {
        "requests": tally.completed + tally.aborted + len(tally.errors),
        "completed": tally.completed,
        "aborted": tally.aborted,
        "concurrency": clients,
        "duration_s": round(elapsed, 1),
        "mismatches": tally.mismatches,
        "errors": tally.errors,
        "healthy_after": health == 200,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None, help="default: a random tiny Llama")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=3000)
    ap.add_argument("--kv-blocks", type=int, default=64, help="KV blocks of 16 tokens")
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = ap.parse_args()

    from mesa_vllm.eval.server import LocalServer
    from mesa_vllm.testing.tiny_models import make_random_model

    model = args.model or make_random_model(
        "llama", Path.home() / ".cache" / "mesa_vllm" / "soak-llama-64", train_len=TRAIN_LEN
    )
    with LocalServer(
        str(model),
        server_args(args.kv_blocks),
        log_path="soak-server.log",
        served_name="soak",
        timeout=600,
    ) as srv:
        rss0 = _rss_mb(srv.proc.pid)
        print(f"server up; soaking {args.clients} clients for {args.duration:.0f} s", flush=True)
        summary = run_soak(srv.base_url, "soak", args.duration, args.clients, args.max_requests)
        summary["preemptions"] = _preemptions(srv.base_url)
        summary["rss_mb_before"] = round(rss0, 1)
        summary["rss_mb_after"] = round(_rss_mb(srv.proc.pid), 1)
    failures = len(summary["mismatches"]) + len(summary["errors"])
    summary["failures"] = failures
    print(
        f"requests {summary['requests']} (completed {summary['completed']}, aborted "
        f"{summary['aborted']}), concurrency {summary['concurrency']}, duration "
        f"{summary['duration_s']} s, failures {failures}, preemptions "
        f"{summary['preemptions']:.0f}, RSS {summary['rss_mb_before']} -> "
        f"{summary['rss_mb_after']} MB, healthy after: {summary['healthy_after']}"
    )
    for line in summary["mismatches"][:10] + summary["errors"][:10]:
        print("  FAIL", line)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 1 if failures or not summary["healthy_after"] else 0


if __name__ == "__main__":
    sys.exit(main())
