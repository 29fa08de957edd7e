"""Eval CLI without a server: several tasks, sample caps, the parallel scheduler and ports."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from mesa_vllm.eval import cli, harness, parallel
from mesa_vllm.eval.server import (
    LocalServer,
    ServerError,
    ephemeral_range,
    release_port,
    reserve_port,
)

pytestmark = pytest.mark.unit


def _parse(*argv: str):
    return cli.build_parser().parse_args([*argv, "--base-url", "http://x"])


def test_several_tasks_parse_and_single_task_unchanged():
    assert _parse("passkey").task == "passkey"
    args = _parse("passkey, needle,ppl,needle")
    assert args.task == "passkey,needle,ppl"
    assert cli.parse_tasks(args.task) == ["passkey", "needle", "ppl"]
    assert cli.task_samples("needle", args) == args.samples == 20
    args = _parse("needle,ppl", "--samples", "6", "--needle-samples", "2")
    assert cli.task_samples("needle", args) == 2 and cli.task_samples("ppl", args) == 6


def test_bad_task_and_option_combinations_exit_2(capsys, tmp_path):
    assert cli.main(["passkey,bogus", "--base-url", "http://x"]) == 2
    assert "unknown task(s) bogus" in capsys.readouterr().err
    base = ["--base-url", "http://127.0.0.1:1", "--out", str(tmp_path)]
    assert cli.main(["passkey", "--text", "f.txt", *base]) == 2
    assert "--text is for the ppl task" in capsys.readouterr().err
    assert cli.main(["ppl", "--parallel-servers", "0", *base]) == 2
    assert cli.main(["needle", "--needle-samples", "0", *base]) == 2
    assert cli.main(["ppl", "--max-samples-at", "64", *base]) == 2
    assert "LEN:N" in capsys.readouterr().err


def test_max_samples_at_caps_jobs_per_method():
    args = _parse("needle", "--max-samples-at", "200:2,400:1", "--max-samples-methods", "mesa,yarn")
    assert args.max_samples_at == {200: 2, 400: 1}
    assert [cli.sample_cap(args.max_samples_at, n) for n in (100, 200, 399, 400, 800)] == [
        None,
        2,
        2,
        1,
        1,
    ]
    jobs = [
        harness.Job(n, d, i, "p", "1", n)
        for n in (100, 200, 400)
        for d in (0.0, 1.0)
        for i in range(3)
    ]
    kept = cli.method_jobs("mesa", jobs, args)
    count = {n: sum(j.length == n for j in kept) for n in (100, 200, 400)}
    assert count == {100: 6, 200: 4, 400: 2}  # per depth x length cell
    assert all(j.index < 2 for j in kept if j.length == 200)
    assert cli.method_jobs("stock", jobs, args) == jobs  # not a capped method
    assert cli.method_jobs("stock", jobs, _parse("needle")) == jobs


def test_memory_share():
    assert parallel.memory_share(1) is None
    assert parallel.memory_share(2) == 0.45
    assert parallel.memory_share(3) == 0.3
    assert parallel.memory_share(12) == 0.075
    assert parallel.memory_share(7) * 7 <= 0.9
    assert parallel.memory_share(4, ["--gpu-memory-utilization", "0.2"]) is None
    assert parallel.memory_share(4, ["--gpu-memory-utilization=0.2"]) is None
    assert parallel.memory_share(4, ["--enforce-eager"]) == 0.225
    assert parallel.memory_share(4, cpu=True) is None
    with pytest.raises(ValueError):
        parallel.memory_share(0)
    assert parallel.effective_parallel(4, 2) == 2 and parallel.effective_parallel(4, 0) == 1


def test_start_gate_only_where_vllm_measures_free_memory():
    assert parallel.needs_start_gate(2)
    assert not parallel.needs_start_gate(1)
    assert not parallel.needs_start_gate(4, cpu=True)
    assert not parallel.needs_start_gate(4, ["--kv-cache-memory-bytes", "8G"])
    assert not parallel.needs_start_gate(4, ["--kv-cache-memory-bytes=8G"])
    assert parallel.needs_start_gate(4, ["--enforce-eager"])


def test_run_all_keeps_order_and_limits_concurrency():
    running, peak, lock = [0], [0], threading.Lock()

    def work(name: str) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 * (5 - int(name)))  # later names finish first
        with lock:
            running[0] -= 1
        return f"r{name}"

    names = ["0", "1", "2", "3", "4"]
    pool = parallel.ServerPool()
    assert parallel.run_all(names, 2, work, pool) == [f"r{n}" for n in names]
    assert peak[0] == 2
    peak[0] = 0
    assert parallel.run_all(names, 1, work, pool) == [f"r{n}" for n in names]
    assert peak[0] == 1


def test_stop_all_stops_every_live_server_at_once():
    """Each fake server's cancel waits until all four are cancelling: one after the other,
    the first would break the barrier."""
    barrier = threading.Barrier(4, timeout=10)
    stopped = []

    class Server:
        def cancel(self) -> None:
            barrier.wait()
            stopped.append(self)

    pool = parallel.ServerPool()
    servers = [Server() for _ in range(4)]
    with contextlib.ExitStack() as stack:
        for srv in servers:
            stack.enter_context(pool.track(srv))
        pool.stop_all()
    assert pool.cancel.is_set() and sorted(map(id, stopped)) == sorted(map(id, servers))


def test_run_all_error_cancels_the_pool():
    pool = parallel.ServerPool()
    started = []

    def work(name: str) -> str:
        started.append(name)
        if name == "bad":
            raise RuntimeError("boom")
        pool.cancel.wait(5)
        return name

    out: list = [None, None]
    with pytest.raises(RuntimeError, match="boom"):
        parallel.run_all(["bad", "ok"], 2, work, pool, out)
    assert pool.cancel.is_set() and "bad" in started and out == [None, None]


def test_gate_serializes_starts():
    pool = parallel.ServerPool(gated=True)
    inside, peak, lock = [0], [0], threading.Lock()

    def start():
        with pool.gate():
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


def test_reserved_ports_are_distinct_and_outside_the_ephemeral_range():
    got: list[int] = []

    def grab():
        got.append(reserve_port())

    threads = [threading.Thread(target=grab) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        lo, hi = ephemeral_range()
        assert len(set(got)) == 16
        assert all(not lo <= p <= hi for p in got)
    finally:
        for p in got:
            release_port(p)


def test_cancelled_server_never_launches(tmp_path):
    srv = LocalServer("no-model", log_path=tmp_path / "s.log")
    srv.cancel()
    with pytest.raises(ServerError, match="cancelled"):
        srv.start()
    assert srv.proc is None and not (tmp_path / "s.log").exists()


def test_timing_table():
    rows = [
        cli._timing("stock", 12.0, {"passkey": 3.0, "ppl": 1.5}),
        cli._timing("mesa", None, {"passkey": 2.0}, "boom"),
    ]
    assert rows[0]["total_s"] == 16.5 and rows[1]["error"] == "boom"
    lines = cli.timing_table(rows, ["passkey", "ppl"]).splitlines()
    assert lines[0].split() == "method server start s passkey s ppl s total s".split()
    assert lines[1].split() == ["stock", "12.0", "3.0", "1.5", "16.5"]
    assert lines[2].split() == ["mesa", "-", "2.0", "-", "2.0"]
