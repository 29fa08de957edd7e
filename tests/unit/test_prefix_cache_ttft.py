"""benchmarks/prefix_cache_ttft.py: the /metrics parsing (on text written by prometheus_client,
as vLLM's server writes it, with the counter names of vLLM 0.26's v1/metrics/loggers.py), the
workload, the servers' flags, and the table with its ratios and equality column."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import prefix_cache_ttft as pct  # noqa: E402

pytestmark = pytest.mark.unit


def _exposition(engines: dict[str, tuple[int, int]]) -> str:
    """/metrics text of counters named as vLLM names them, one label set per engine."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    reg = CollectorRegistry()
    q = Counter("vllm:prefix_cache_queries", "q", ["model_name", "engine"], registry=reg)
    h = Counter("vllm:prefix_cache_hits", "h", ["model_name", "engine"], registry=reg)
    other = Histogram("vllm:prefix_cache_hits_like_histogram", "x", registry=reg)
    other.observe(3.0)
    for e, (queries, hits) in engines.items():
        q.labels(model_name="m", engine=e).inc(queries)
        h.labels(model_name="m", engine=e).inc(hits)
    return generate_latest(reg).decode()


def test_metrics_are_summed_over_engines_and_only_the_counters_count():
    text = _exposition({"0": (900, 512), "1": (100, 0)})
    assert "vllm:prefix_cache_queries_total{" in text  # the exposed name
    assert pct.parse_metrics(text) == {
        "vllm:prefix_cache_queries": 1000.0,
        "vllm:prefix_cache_hits": 512.0,
    }
    before = pct.parse_metrics(_exposition({"0": (10, 4)}))
    after = pct.parse_metrics(text)
    assert pct.counter_delta(before, after) == {"queries": 990.0, "hits": 508.0}
    assert pct.parse_metrics("# nothing yet\n") == dict.fromkeys(pct.METRICS, 0.0)


def test_metric_names_are_vllms():
    spec = importlib.util.find_spec("vllm")
    src = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    for name in pct.METRICS:
        assert f'name="{name}"' in src


def test_random_workload_is_exact_deterministic_and_distinct_per_length():
    d1, q1 = pct.workload(256, 3, 0, 512)
    d1b, q1b = pct.workload(256, 3, 0, 512)
    d2, _ = pct.workload(512, 3, 0, 512)
    assert (d1, q1) == (d1b, q1b)
    assert len(d1) == 256 and len(d2) == 512
    assert [len(q) for q in q1] == [pct.QUESTION_LEN] * 3 and len({tuple(q) for q in q1}) == 3
    assert d1[:16] != d2[:16]  # no length reuses another length's first cache block
    assert min(d1 + d2) >= 128 and max(d1 + d2) < 512
    assert pct.workload(256, 3, 1, 512)[0] != d1


def test_text_workload_uses_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from mesa_vllm.testing.tokenizer import copy_tokenizer

    copy_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    text = enc("The quick brown fox jumps over the lazy dog. " * 3)
    doc, qs = pct.workload(300, 2, 0, 512, enc, text)
    assert len(doc) == 300
    assert tok.decode(doc).startswith("[300 tokens] Read this document")
    assert "quick brown fox" in tok.decode(doc)
    assert tok.decode(qs[1]).startswith("\n\nQuestion 2: what does")
    assert all(len(q) <= pct.QUESTION_LEN for q in qs)
    assert pct.workload(600, 2, 0, 512, enc, text)[0][:2] != doc[:2]


def _mesa_settings(args: list[str]) -> dict:
    return json.loads(args[args.index("--additional-config") + 1])["mesa"]


@pytest.mark.parametrize("cpu", [True, False])
def test_each_config_gets_its_caching_flag_and_split(tmp_path, cpu):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    m, extra = str(tmp_path), "--block-size 16"
    mesa = {"first_chunk": 8}
    ref, _ = pct.config_launch(pct.REF, m, 1024, mesa, extra, cpu)
    assert ("--attention-backend" in ref) is not cpu and "--additional-config" not in ref
    assert ref[-3:] == ["--block-size", "16", "--enable-prefix-caching"]
    assert json.loads(ref[ref.index("--hf-overrides") + 1]) == {"max_position_embeddings": 1024}
    fc, _ = pct.config_launch(pct.FIXED_CACHE, m, 1024, mesa, extra, cpu)
    assert fc[-1] == "--enable-prefix-caching"
    assert _mesa_settings(fc) == {"train_len": 64, "first_chunk": 8, "split": "fixed"}
    f, _ = pct.config_launch(pct.FIXED, m, 1024, mesa, extra, cpu)
    assert f[-1] == "--no-enable-prefix-caching" and _mesa_settings(f)["split"] == "fixed"
    dyn, _ = pct.config_launch(pct.DYNAMIC, m, 1024, {**mesa, "split": "fixed"}, extra, cpu)
    assert dyn[-1] == "--no-enable-prefix-caching" and _mesa_settings(dyn)["split"] == "dynamic"
    # a fixed-grid width stays with the fixed configs; the other settings reach every Mesa one
    narrow = {**mesa, "middle_chunk": 32, "near_window": 16}
    dyn, _ = pct.config_launch(pct.DYNAMIC, m, 1024, narrow, extra, cpu)
    assert _mesa_settings(dyn) == {"train_len": 64, "first_chunk": 8, "near_window": 16,
                                   "split": "dynamic"}  # fmt: skip
    f, _ = pct.config_launch(pct.FIXED, m, 1024, narrow, extra, cpu)
    assert _mesa_settings(f)["middle_chunk"] == 32


def _point(config, doc_len, ttft, tokens, status="ok", cache=None, seconds=1.0):
    return pct.Point(config, doc_len, status, "", seconds, ttft, tokens, cache or {})


def test_table_ratios_equality_and_skips():
    toks = [[5, 6], [7, 8], [9, 9]]
    pts = [
        _point(pct.REF, 256, [30.0, 10.0, 14.0], toks, cache={"queries": 864, "hits": 512}),
        _point(pct.FIXED_CACHE, 256, [40.0, 6.0, 6.0], toks, cache={"queries": 864, "hits": 448}),
        _point(pct.FIXED, 256, [40.0, 24.0, 20.0], [[5, 6], [7, 0], [9, 9]]),
        _point(pct.DYNAMIC, 256, [41.0], [[1, 1]], status="failed"),
        pct.Point(pct.FIXED_CACHE, 4096, "skipped", "prompt+output 4144 > max-model-len"),
    ]
    assert pct.cold_warm(pts[0]) == (30.0, 12.0)
    assert pct.cold_warm(pct.Point("x", 1)) == (None, None)
    assert pct.equality(pts) == {256: (2, 3), 4096: None}
    assert pct.equal_questions(pts[1], pts[3]) is None  # a failed point is not compared
    table, diffs = pct.markdown_table(pts, "header line\n").split("\n\nWhere ")
    rows = table.splitlines()
    assert diffs.splitlines()[1] == (  # question 2 parts at its 2nd token; no gaps recorded
        "- doc 256, question 2: first differs at generated token 2; top-2 log p gap there "
        "- (mesa fixed+cache) / - (mesa fixed)"
    )
    assert rows[:2] == ["header line", ""]  # a blank line: markdown starts the table
    assert rows[2].startswith("| config | doc tokens | Q | cold TTFT ms | warm TTFT p50 ms |")
    cells = {(r.split(" | ")[0][2:], r.split(" | ")[1]): r.split(" | ") for r in rows[4:]}
    fc = cells[(pct.FIXED_CACHE, "256")]
    assert fc[3:10] == ["40.0", "6.0", "1.00", "0.273x", "0.500x", "448 / 864", "2/3"]
    assert fc[10] == "ok |"
    assert cells[(pct.FIXED, "256")][6:10] == ["1.000x", "1.833x", "-", "-"]
    assert cells[(pct.DYNAMIC, "256")][4] == "-"  # one question: no warm median
    assert rows[-1].endswith("skipped: prompt+output 4144 > max-model-len |")
    assert [r.split(" | ")[1] for r in rows[4:]] == ["256"] * 4 + ["4096"]


def test_streamed_top2_gives_the_gap_and_the_table_names_where_runs_part():
    ids, gaps = pct.chunk_tokens({"logprobs": {
        "tokens": ["token_id:7", "token_id:9"],
        "top_logprobs": [{"token_id:7": -0.25, "token_id:3": -1.5}, {"token_id:9": -0.5}],
    }})  # fmt: skip
    assert ids == [7, 9] and gaps == [1.25, None]
    assert pct.chunk_tokens({"logprobs": {"tokens": ["token_id:4"]}}) == ([4], [None])
    cached = _point(pct.FIXED_CACHE, 256, [9.0, 9.0], [[1, 2, 3], [4, 5, 6]])
    cached.gaps = [[2.0, 2.0, 2.0], [1.0, 0.0625, 1.0]]
    plain = _point(pct.FIXED, 256, [9.0, 9.0], [[1, 2, 3], [4, 8, 6]])
    assert pct.first_differences(cached, plain) == [
        {"question": 2, "token": 1, "gap": 0.0625, "gap_other": None}
    ]
    table = pct.markdown_table([cached, plain])
    assert "- doc 256, question 2: first differs at generated token 2; top-2 log p gap " in table
    assert "0.062 (mesa fixed+cache) / - (mesa fixed)" in table
    assert "part" not in pct.markdown_table([cached, _point(pct.FIXED, 256, [9.0], cached.tokens)])


def test_estimate_prefers_another_config_at_the_same_length():
    done = [_point(pct.REF, 1024, [1.0], [[1]], seconds=8.0)]
    assert pct.estimate_seconds(pct.Point(pct.FIXED, 1024), done) == 8.0
    assert pct.estimate_seconds(pct.Point(pct.REF, 4096), done) == 32.0
    assert pct.estimate_seconds(pct.Point(pct.FIXED, 4096), done) == 0.0


@pytest.mark.parametrize("concurrent", [False, True])
def test_questions_go_one_at_a_time_or_2_to_q_at_once(concurrent):
    """The server side is a stand-in here: it answers after all callers it expects are in
    flight together (a barrier), so a sequential sender can never pass the concurrent case."""
    import threading

    doc, qs = [1, 2], [[10], [11], [12], [13]]
    together = threading.Barrier(len(qs) - 1, timeout=5)
    in_flight, peak, sent = [0], [0], []
    lock = threading.Lock()

    def ask_one(prompt):
        with lock:
            sent.append(prompt[-1])
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        if concurrent and prompt[-1] != 10:
            together.wait()  # BrokenBarrierError if questions 2..Q are not in flight together
        with lock:
            in_flight[0] -= 1
        return float(prompt[-1]), prompt

    out = pct.ask_questions(ask_one, doc, qs, concurrent)
    assert [ids for _, ids in out] == [doc + q for q in qs]  # question order kept
    assert sent[0] == 10  # question 1 first, alone
    assert peak[0] == (len(qs) - 1 if concurrent else 1)
