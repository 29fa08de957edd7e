"""Run several methods' servers at once (``mesa-vllm eval --parallel-servers K``).

- ``memory_share``: each of K concurrent GPU servers gets ``--gpu-memory-utilization``
  = 0.9 / K (floored to 4 decimals), unless the user's ``--server-args`` set it; on the CPU
  build the platform default is kept (its "utilization" is a free-memory guard, not a share).
- ``ServerPool``: what the worker threads share: a cancel event (set on Ctrl-C / SIGTERM),
  the live servers (so the main thread can stop them all), and on the GPU a start gate.
  vLLM sizes its KV cache by measuring the device's free memory before and after a profiling
  run, assuming no other process allocates or frees memory meanwhile (vLLM 0.26
  ``gpu_worker.determine_available_memory``; freeing trips its assertion, allocating shrinks
  the cache).  So on the GPU server starts and stops hold the gate: one start at a time
  (launch to ``/health``), never during another's stop; evaluations run concurrently.
  With ``--kv-cache-memory-bytes`` in the server args vLLM skips that measurement and takes
  the given size, so the servers start at once, ungated (``needs_start_gate``).
- ``run_all``: apply ``work`` to every method, at most K at a time (threads), results in
  method order; with K = 1 in the calling thread, exactly as a plain loop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")
TOTAL_SHARE = 0.9
UTIL_FLAG = "--gpu-memory-utilization"
KV_FLAG = "--kv-cache-memory-bytes"


def sets_memory_utilization(server_args: Sequence[str]) -> bool:
    """True when ``server_args`` already pass ``--gpu-memory-utilization``."""
    return any(a == UTIL_FLAG or a.startswith(UTIL_FLAG + "=") for a in server_args)


def needs_start_gate(k: int, server_args: Sequence[str] = (), cpu: bool = False) -> bool:
    """True when concurrent GPU starts must be serialized: k > 1 on a GPU and vLLM will size
    its KV cache by measuring free memory (no ``--kv-cache-memory-bytes`` given)."""
    fixed = any(a == KV_FLAG or a.startswith(KV_FLAG + "=") for a in server_args)
    return k > 1 and not cpu and not fixed


def memory_share(k: int, server_args: Sequence[str] = (), cpu: bool = False) -> float | None:
    """``--gpu-memory-utilization`` for each of ``k`` concurrent servers, or None for "leave
    it alone" (k = 1, the CPU build, or the user's ``server_args`` set it)."""
    if k < 1:
        raise ValueError(f"parallel servers must be >= 1, got {k}")
    if k == 1 or cpu or sets_memory_utilization(server_args):
        return None
    return int(TOTAL_SHARE / k * 10000) / 10000


def effective_parallel(k: int, n_methods: int) -> int:
    """How many servers really run at once: at most one per method, at least 1."""
    return max(1, min(k, n_methods))


class ServerPool:
    """Shared state of the method workers: cancel event, live servers, optional start gate."""

    def __init__(self, gated: bool = False) -> None:
        self.cancel = threading.Event()
        self._gate = threading.Lock() if gated else None
        self._lock = threading.Lock()
        self._live: set[Any] = set()

    @contextlib.contextmanager
    def gate(self) -> Iterator[float]:
        """Hold the start/stop gate (a no-op without one); yields the seconds waited for it."""
        t0 = time.monotonic()
        if self._gate is None:
            yield 0.0
            return
        with self._gate:
            yield time.monotonic() - t0

    @contextlib.contextmanager
    def track(self, server: Any) -> Iterator[Any]:
        """Register ``server`` (anything with ``cancel()``) as live for the block."""
        with self._lock:
            self._live.add(server)
        try:
            yield server
        finally:
            with self._lock:
                self._live.discard(server)

    def stop_all(self) -> None:
        """Set the cancel event and cancel every live server (stops the running ones, in
        parallel)."""
        self.cancel.set()
        with self._lock:
            live = list(self._live)
        # all at once: each stop may wait out its grace period, and K of them in a row can
        # outlast the time an interrupted run has left
        stoppers = [threading.Thread(target=srv.cancel, daemon=True) for srv in live]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


def run_all(
    names: Sequence[str],
    k: int,
    work: Callable[[str], T],
    pool: ServerPool,
    out: list[T | None] | None = None,
) -> list[T | None]:
    """``[work(n) for n in names]`` with up to ``k`` running at once, in ``names`` order.

    ``out`` (default: a new list), sized like ``names``, receives each result as its worker
    returns, so a caller that catches KeyboardInterrupt still has the finished ones.  On
    KeyboardInterrupt (or a worker's exception): ``pool.stop_all()``, wait for the workers to
    return, re-raise; ``pool.cancel`` tells workers to stop early and their results are
    dropped.  With k = 1 the work runs in this thread, one method after the other.
    """
    out = [None] * len(names) if out is None else out
    k = effective_parallel(k, len(names))
    if k == 1:
        for i, n in enumerate(names):
            out[i] = work(n)
        return out
    ex = ThreadPoolExecutor(max_workers=k, thread_name_prefix="method")
    futs: dict[Future, int] = {ex.submit(work, n): i for i, n in enumerate(names)}
    try:
        pending = set(futs)
        while pending:  # short waits keep the main thread responsive to signals
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                out[futs[f]] = f.result()
    except BaseException:
        pool.stop_all()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return out
