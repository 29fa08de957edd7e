"""Report output from synthetic results: JSON round trip, table numbers, valid PNGs."""

from __future__ import annotations

import json
import math
import struct

import pytest

from mesa_vllm.eval import harness, report

pytestmark = pytest.mark.unit

LENGTHS = [64, 128, 256, 512]
ACC = {"stock": [1.0, 0.35, 0.0, 0.0], "mesa": [1.0, 0.95, 0.9, 0.85]}
PPL = {"stock": [3.25, 40.5, 1234.5, None], "mesa": [3.25, 3.5, 3.75, 4.0]}
DEPTHS = [0.0, 0.5, 1.0]


def _acc_point(n: int, acc: float, depth: float | None = None) -> dict:
    return {
        "length": n,
        "depth": depth,
        "n": 20,
        "correct": round(acc * 20),
        "accuracy": acc,
        "errors": 0,
        "skipped": 0,
        "prompt_tokens": n - 3.0,
        "first_error": None,
    }


def _results(task: str) -> dict:
    meths = []
    for name in ACC:
        if task == "passkey":
            pts = [_acc_point(n, a) for n, a in zip(LENGTHS, ACC[name], strict=True)]
        elif task == "needle":
            pts = [
                _acc_point(n, a * (1 - d / 4), d)
                for n, a in zip(LENGTHS, ACC[name], strict=True)
                for d in DEPTHS
            ]
        else:
            pts = [
                {
                    "length": n,
                    "depth": None,
                    "n": 4,
                    "ppl": p,
                    "ppl_all": p,
                    "scored_tokens": 40,
                    "errors": 0 if p else 4,
                    "skipped": 0,
                    "prompt_tokens": n - 2.0,
                    "first_error": None if p else "BadRequestError: x",
                }
                for n, p in zip(LENGTHS, PPL[name], strict=True)
            ]
        meths.append({"name": name, "error": None, "points": pts, "records": []})
    return {
        "task": task,
        "meta": {"train_len": 64, "lengths": LENGTHS, "samples": 20, "seed": 0},
        "methods": meths,
    }


def _table_cells(md: str) -> dict[int, list[str]]:
    """First table of the Markdown: {length: [cell per method]}."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            if int(cells[0]) in rows:
                break
            rows[int(cells[0])] = cells[1:]
        elif rows:
            break
    return rows


def _check_png(path) -> None:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert width > 100 and height > 100
    assert len(raw) > 5000


@pytest.mark.parametrize("task", ["passkey", "needle", "ppl"])
def test_write_all(tmp_path, task):
    res = _results(task)
    paths = report.write_all(res, tmp_path)
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["task"] == task and [m["name"] for m in back["methods"]] == ["stock", "mesa"]
    assert back["methods"][1]["points"] == res["methods"][1]["points"]
    pngs = [p for p in paths.values() if p.suffix == ".png"]
    assert len(pngs) == (2 if task == "needle" else 1)
    for p in pngs:
        _check_png(p)


def test_table_numbers_equal_inputs():
    md = report.markdown(_results("passkey"))
    cells = _table_cells(md)
    assert sorted(cells) == LENGTHS
    for i, n in enumerate(LENGTHS):
        assert [float(c) for c in cells[n]] == [ACC["stock"][i], ACC["mesa"][i]]


def test_ppl_table_and_missing_values():
    md = report.markdown(_results("ppl"))
    cells = _table_cells(md)
    for i, n in enumerate(LENGTHS):
        for j, name in enumerate(["stock", "mesa"]):
            want = PPL[name][i]
            assert cells[n][j] == "-" if want is None else float(cells[n][j]) == want
    assert "stock @ 512: 4/4 request errors" in md


def test_ppl_relative_table_only_with_shared_ends():
    res = _results("ppl")
    assert "relative to" not in report.markdown(res)
    res["meta"]["ppl_shared_end"] = True
    md = report.markdown(res)
    rel = md.split("relative to 64 tokens")[1].split("###")[0]
    rows = {int(r.split("|")[1]): [c.strip() for c in r.split("|")[2:-1]]
            for r in rel.splitlines() if r.startswith("| ") and r[2].isdigit()}  # fmt: skip
    for i, n in enumerate(LENGTHS):
        for j, name in enumerate(["stock", "mesa"]):
            v, base = PPL[name][i], PPL[name][0]
            assert rows[n][j] == ("-" if v is None else f"{v / base:.3f}x")


def test_needle_table_is_mean_over_depths_and_grid():
    res = _results("needle")
    md = report.markdown(res)
    cells = _table_cells(md)
    for i, n in enumerate(LENGTHS):
        want = sum(ACC["mesa"][i] * (1 - d / 4) for d in DEPTHS) / len(DEPTHS)
        assert float(cells[n][1]) == pytest.approx(want, abs=0.0051)
    assert "### Needle accuracy, mesa" in md


def test_json_has_no_nan_and_failed_method(tmp_path):
    res = _results("ppl")
    res["methods"][0]["points"][0]["ppl"] = math.inf
    res["methods"].append({"name": "yarn", "error": "server exited with code 1\nlog", "points": []})
    report.write_all(res, tmp_path)
    text = (tmp_path / "results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    md = (tmp_path / "table.md").read_text()
    assert "yarn: not evaluated: server exited with code 1" in md
    assert all(row[2] == "error" for row in _table_cells(md).values())


def test_aggregate_counts_errors_and_skips():
    recs = [
        {
            "length": 64,
            "depth": None,
            "prompt_tokens": 60,
            "error": None,
            "skipped": None,
            "correct": True,
        },
        {
            "length": 64,
            "depth": None,
            "prompt_tokens": 62,
            "error": "APIError: boom",
            "skipped": None,
        },
        {"length": 128, "depth": None, "prompt_tokens": 120, "error": None, "skipped": "long"},
    ]
    pts = harness.aggregate("passkey", recs)
    assert pts[0]["accuracy"] == 0.5 and pts[0]["errors"] == 1 and pts[0]["correct"] == 1
    assert pts[1]["accuracy"] is None and pts[1]["skipped"] == 1
    ppl_recs = [
        {
            "length": 64,
            "depth": None,
            "prompt_tokens": 60,
            "error": None,
            "skipped": None,
            "nll_sum": 2.0 * 10,
            "scored": 10,
            "nll_sum_all": 30.0,
            "scored_all": 30,
        }
    ]
    (pt,) = harness.aggregate("ppl", ppl_recs)
    assert pt["ppl"] == pytest.approx(math.exp(2.0)) and pt["ppl_all"] == pytest.approx(math.e)


def test_make_jobs_deterministic_and_sized():
    from transformers import AutoTokenizer

    from mesa_vllm.testing.tokenizer import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    a = harness.make_jobs("needle", tok, [100, 200], 2, seed=1, depths=[0.0, 1.0])
    b = harness.make_jobs("needle", tok, [100, 200], 2, seed=1, depths=[0.0, 1.0])
    assert a == b and len(a) == 8
    assert all(j.n_tokens <= j.length and j.n_tokens > j.length - 30 for j in a)
    ppl = harness.make_jobs("ppl", tok, [150], 1, seed=0)
    assert ppl[0].key is None and 120 < ppl[0].n_tokens <= 150


def test_ppl_whole_text_table_and_text_label():
    res = _results("ppl")
    for p in res["methods"][1]["points"]:
        p["ppl_all"] = 2 * p["ppl"]
    res["meta"].update(
        ppl_tail=256,
        text={"path": "/c/pydoc.txt", "provenance": {"package": "python3-doc", "version": "3"}},
    )
    md = report.markdown(res)
    assert "## Perplexity (last 256 tokens of each text)" in md
    assert "text: pydoc.txt (python3-doc 3)" in md
    whole = md.split("### Perplexity over the whole text (ppl_all)")[1]
    cells = _table_cells(whole)
    assert [float(cells[n][1]) for n in LENGTHS] == [2 * v for v in PPL["mesa"]]
    res["meta"]["text"] = None
    assert "text: synthetic passkey filler" in report.markdown(res)
