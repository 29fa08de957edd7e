"""benchmarks/serve_load.py: the grid (skips, prompts per point, the budget's estimate) and
the table built from `vllm bench serve` result JSONs (hand-made here, with the fields vLLM
0.26's benchmarks/serve.py writes; the last tests check those names against that source)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serve_load as sl  # noqa: E402

pytestmark = pytest.mark.unit


def _result(req_s, out_tok_s, tpot_p50, ttft_p50=10.0, n=8, failed=0):
    """A `vllm bench serve --save-result` JSON (the fields the table reads, and a few more)."""
    return {
        "backend": "vllm", "label": "x", "num_prompts": n, "max_concurrency": 1,
        "duration": n / req_s, "completed": n - failed, "failed": failed,
        "total_input_tokens": 64 * n, "total_output_tokens": 16 * n,
        "request_throughput": req_s, "output_throughput": out_tok_s,
        "total_token_throughput": out_tok_s * 5,
        "mean_ttft_ms": ttft_p50, "median_ttft_ms": ttft_p50, "p50_ttft_ms": ttft_p50,
        "p99_ttft_ms": 2 * ttft_p50, "mean_tpot_ms": tpot_p50, "median_tpot_ms": tpot_p50,
        "p50_tpot_ms": tpot_p50, "p99_tpot_ms": 1.5 * tpot_p50,
    }  # fmt: skip


def test_prompts_per_point_are_two_waves_at_least_eight():
    assert [sl.num_prompts_for(c) for c in (1, 4, 8, 32, 64)] == [8, 8, 16, 64, 128]
    assert sl.num_prompts_for(8, waves=3, minimum=30) == 30


def test_grid_runs_in_the_given_order_and_skips_what_does_not_fit():
    g = sl.build_grid(["FLASH_ATTN", "mesa"], [1024, 32768, 65536], [1, 64], 256, 65536)
    assert [(p.backend, p.input_len, p.concurrency) for p in g[:6]] == [
        ("FLASH_ATTN", 1024, 1), ("FLASH_ATTN", 1024, 64), ("FLASH_ATTN", 32768, 1),
        ("FLASH_ATTN", 32768, 64), ("FLASH_ATTN", 65536, 1), ("FLASH_ATTN", 65536, 64),
    ]  # fmt: skip
    skipped = [(p.backend, p.input_len) for p in g if p.status == "skipped"]
    assert skipped == [("FLASH_ATTN", 65536)] * 2 + [("mesa", 65536)] * 2
    assert "65793 > max-model-len 65536" in g[4].reason
    # the server's BOS counts: input + output == max-model-len does not fit
    edge = sl.build_grid(["mesa"], [65280, 65279], [1], 256, 65536)
    assert [p.status for p in edge] == ["skipped", "pending"]


def test_estimate_scales_the_last_point_of_that_length_by_waves():
    g = sl.build_grid(["mesa"], [1024, 32768], [1, 8, 64], 256, 65536)
    a1, a8, a64, b1, b8, _ = g
    assert sl.estimate_seconds(a1, []) == 0.0
    a1.seconds = 12.0  # 8 waves of 1
    assert sl.estimate_seconds(a8, [a1]) == pytest.approx(12.0 * 2 / 8)
    a8.seconds = 4.0
    assert sl.estimate_seconds(a64, [a1, a8]) == pytest.approx(4.0)
    # a new length: the last finished point of any length, unscaled
    assert sl.estimate_seconds(b1, [a1, a8]) == pytest.approx(4.0)
    b1.seconds = 30.0
    assert sl.estimate_seconds(b8, [a1, a8, b1]) == pytest.approx(30.0 * 2 / 8)


def _finished():
    g = sl.build_grid(["FLASH_ATTN", "mesa"], [1024, 32768, 131072], [1, 8], 256, 65536)
    res = {
        ("FLASH_ATTN", 1024, 1): _result(2.0, 500.0, 2.0),
        ("FLASH_ATTN", 1024, 8): _result(10.0, 2500.0, 3.0),
        ("mesa", 1024, 1): _result(1.9, 490.0, 2.1),
        ("mesa", 1024, 8): _result(9.0, 2400.0, 3.3, failed=1),
        ("FLASH_ATTN", 32768, 1): _result(1.0, 250.0, 2.5),
        ("mesa", 32768, 1): _result(1.5, 300.0, 2.4),
    }
    for p in g:
        r = res.get((p.backend, p.input_len, p.concurrency))
        if r is not None:
            p.status, p.result, p.seconds = "ok", sl.summarize(r), 5.0
        elif p.status == "pending":
            p.status, p.reason = "budget", "estimated 9 s, 3 s left"
    return g


def test_ratios_are_mesa_over_flash_attn_where_both_finished():
    rat = sl.ratios(_finished())
    assert set(rat) == {(1024, 1), (1024, 8), (32768, 1)}
    assert rat[(1024, 1)]["request_throughput"] == pytest.approx(0.95)
    assert rat[(1024, 8)]["output_throughput"] == pytest.approx(0.96)
    assert rat[(1024, 8)]["median_tpot_ms"] == pytest.approx(1.1)
    assert rat[(32768, 1)]["request_throughput"] == pytest.approx(1.5)


def test_table_has_every_point_its_status_and_the_ratios():
    table = sl.markdown_table(_finished(), ["FLASH_ATTN", "mesa"], "header line\n")
    lines = table.splitlines()
    assert lines[0] == "header line"
    head = [c.strip() for c in lines[2].strip("|").split("|")]
    assert head[:4] == ["backend", "input", "conc", "prompts"]
    assert "mesa/FLASH_ATTN TPOT p50" in head and head[-2:] == ["JIT compiles", "status"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[4:]]
    assert len(rows) == 12  # 2 backends x 3 lengths x 2 concurrencies
    by = {(r[0], int(r[1]), int(r[2])): dict(zip(head, r, strict=True)) for r in rows}
    m = by[("mesa", 1024, 8)]
    assert m["req/s"] == "9.00" and m["out tok/s"] == "2400" and m["TPOT p50 ms"] == "3.30"
    assert m["TTFT p99 ms"] == "20.0" and m["TPOT p99 ms"] == "4.95"
    assert m["mesa/FLASH_ATTN req/s"] == "0.900x"
    assert m["mesa/FLASH_ATTN TPOT p50"] == "1.100x"
    assert m["status"] == "ok (1 requests failed)"
    assert by[("FLASH_ATTN", 1024, 8)]["mesa/FLASH_ATTN req/s"] == "-"
    assert by[("mesa", 32768, 8)]["status"].startswith("budget: estimated")
    assert by[("mesa", 32768, 8)]["req/s"] == "-"
    assert by[("FLASH_ATTN", 131072, 1)]["status"].startswith("skipped: input+output+BOS")
    # sorted by input length, then concurrency, FLASH_ATTN first
    assert [(r[0], r[1], r[2]) for r in rows[:3]] == [
        ("FLASH_ATTN", "1024", "1"), ("mesa", "1024", "1"), ("FLASH_ATTN", "1024", "8"),
    ]  # fmt: skip


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    assert sl.plot(_finished(), ["FLASH_ATTN", "mesa"], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def _vllm_bench_source() -> str:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "benchmarks"
    return (root / "serve.py").read_text() + (root / "datasets" / "datasets.py").read_text()


def test_result_fields_are_the_ones_vllm_bench_serve_writes():
    src = _vllm_bench_source()
    for key in ("request_throughput", "output_throughput", "completed", "failed", "duration",
                "total_input_tokens", "total_output_tokens"):  # fmt: skip
        assert f'"{key}": metrics.' in src or f'"{key}": benchmark_duration' in src, key
    # median_<m>_ms and p<P>_<m>_ms come from process_one_metric's f-strings
    assert 'result[f"median_{metric_attribute_name}_ms"]' in src
    assert 'result[f"p{p_word}_{metric_attribute_name}_ms"]' in src
    used = {key for _, key, _ in sl.METRICS}
    assert used == {"request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
                    "median_tpot_ms", "p99_tpot_ms"}  # fmt: skip


def test_bench_command_uses_only_flags_vllm_bench_serve_has(tmp_path):
    src = _vllm_bench_source()
    p = sl.Point("mesa", 1024, 8, 16)
    cmd = sl.bench_command(p, "http://h:1", "m", "tok", 256, 0, 1, tmp_path)
    flags = [a for a in cmd if a.startswith("--")]
    assert "--ignore-eos" in flags and "--save-result" in flags
    for f in flags:
        assert re.search(rf'"{re.escape(f)}"', src), f
    assert cmd[cmd.index("--max-concurrency") + 1] == "8"
    assert cmd[cmd.index("--num-prompts") + 1] == "16"
    assert cmd[cmd.index("--result-filename") + 1] == "mesa-in1024-c8.json"
    assert cmd[cmd.index("bench") + 1] == "serve"


def test_bench_worker_runs_several_points_in_one_process(tmp_path):
    """The persistent worker runs vLLM's real CLI main once per request, keeps running after a
    failing request (argparse error, exit 2), and writes each request's output to its log."""
    worker = sl.BenchWorker()
    try:
        assert worker.run(["--version"], tmp_path / "a.log", timeout=300) == 0
        pid = worker.proc.pid
        assert worker.run(["bench", "serve", "--no-such-flag"], tmp_path / "b.log", 300) == 2
        assert worker.run(["--version"], tmp_path / "c.log", timeout=300) == 0
        assert worker.proc.pid == pid  # the same process served all three
    finally:
        worker.close()
    import vllm

    assert vllm.__version__.split("+")[0] in (tmp_path / "c.log").read_text()
    assert "--no-such-flag" in (tmp_path / "b.log").read_text()
    assert (tmp_path / "a.log").read_text().startswith("$ vllm --version")


def test_jit_compiles_counts_the_warnings_vllms_monitor_logs(tmp_path):
    # the message as vllm/utils/jit_monitor.py formats it, once per compile in verbose mode
    from vllm.utils import jit_monitor

    src = Path(jit_monitor.__file__).read_text()
    fmt = re.search(r'"(%s %s during inference: %s%s\. )"', src).group(1)
    line = "(EngineCore pid=7) WARNING 12-01 23:10:01 [jit_monitor.py:131] " + fmt % (
        "Triton",
        "JIT compilation",
        "_decode_kernel",
        "",
    )
    log = tmp_path / "server.log"
    log.write_text("INFO ready\n" + (line + "\n") * 3 + "INFO 200 OK\n")
    assert sl.jit_compiles(log) == 3
    assert sl.jit_compiles(tmp_path / "missing.log") == 0
