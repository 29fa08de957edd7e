"""The eval harness against real vLLM servers (CPU, random-weight tiny Llama).

One server (train_len 64, max-model-len 512) serves: passkey at 2 lengths x 2 samples (both
past the trained length: the shortest passkey prompt is 65 tokens with the bundled tokenizer),
perplexity at 1 length inside it on synthetic filler and on windows of a real text file (sent
as token ids: exactly N prompt tokens), all through the CLI's ``--base-url`` mode; then the
server is stopped and must be gone (port closed, process gone).  Random weights: accuracy is
only checked to be in [0, 1].

Then one ``--serve`` run of two tasks (passkey,ppl) with ``--parallel-servers 2``: ``mesa``
with an invalid Mesa config (its server fails in seconds) and ``stock`` start at once; the
results keep method order, ``stock`` has both tasks' points, ``mesa`` its error, and each
method's wall times are in the meta.
"""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest

from mesa_vllm.eval import cli, methods
from mesa_vllm.eval.server import LocalServer, free_port, port_open

pytestmark = pytest.mark.e2e

TRAIN_LEN = 64
MAX_LEN = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mesa_vllm.testing.tiny_models import make_random_model

    return str(make_random_model("llama", tmp_path_factory.mktemp("tiny"), train_len=TRAIN_LEN))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    ctx = methods.ServeContext(model_dir, TRAIN_LEN, MAX_LEN)
    launch = methods.build_launch("stock", ctx, cpu=methods.is_cpu_install())
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = LocalServer(model_dir, launch.args, launch.env, log, served_name="stock", timeout=240)
    with srv:
        yield srv
    assert srv.proc is None


def _run(task, server, model_dir, out, *extra) -> dict:
    argv = [
        task,
        "--base-url",
        server.base_url,
        "--model",
        "stock",
        "--method-name",
        "stock",
        "--tokenizer",
        model_dir,
        "--train-len",
        str(TRAIN_LEN),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    assert cli.main(argv) == 0
    for name in ("results.json", "table.md", f"{task}.png"):
        assert (out / name).stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def _text_file(path):
    """Real English text: some standard-library docstrings, as documents."""
    import argparse
    import json as json_mod
    import random
    import threading

    docs = [inspect.getdoc(m) for m in (argparse, json_mod, random, threading, inspect)]
    path.write_text("\n\n".join(d for d in docs if d))
    return path


def test_ppl_on_text_windows(server, model_dir, tmp_path):
    text = _text_file(tmp_path / "docs.txt")
    res = _run(
        "ppl",
        server,
        model_dir,
        tmp_path / "ppl",
        *("--lengths", "32,64", "--samples", "2", "--text", str(text), "--ppl-tail", "16"),
    )
    assert res["meta"]["text"]["path"] == str(text.resolve()) and res["meta"]["text"]["bos"]
    m = res["methods"][0]
    for p in m["points"]:
        assert p["errors"] == 0 and p["scored_tokens"] == 2 * 16
        assert p["scored_tokens_all"] == 2 * (p["length"] - 1)
        assert math.isfinite(p["ppl"]) and math.isfinite(p["ppl_all"])
    for r in m["records"]:  # token-id prompts: exactly N tokens, as the server counted them
        assert r["prompt_tokens"] == r["length"]
    offsets = [r["offset"] for r in m["records"] if r["length"] == 64]
    assert len(set(offsets)) == 2


def test_passkey_ppl_and_shutdown(server, model_dir, tmp_path):
    res = _run(
        "passkey", server, model_dir, tmp_path / "pk", "--lengths", "80,160", "--samples", "2"
    )
    assert res["task"] == "passkey" and res["meta"]["lengths"] == [80, 160]
    (m,) = res["methods"]
    assert m["name"] == "stock" and m["error"] is None and m["max_model_len"] == MAX_LEN
    assert [p["length"] for p in m["points"]] == [80, 160]
    for p in m["points"]:
        assert p["n"] == 2 and p["skipped"] == 0
        assert 0.0 <= p["accuracy"] <= 1.0
        assert 0 < p["prompt_tokens"] <= p["length"]
    assert len(m["records"]) == 4 and all("answer" in r or r["error"] for r in m["records"])

    res = _run("ppl", server, model_dir, tmp_path / "ppl", "--lengths", "60", "--samples", "1")
    (p,) = res["methods"][0]["points"]
    assert p["errors"] == 0 and p["scored_tokens"] > 0
    assert math.isfinite(p["ppl"]) and p["ppl"] > 1.0
    assert math.isfinite(p["ppl_all"]) and p["ppl_all"] > 1.0

    pid, port = server.proc.pid, server.port
    server.stop()
    assert not port_open("127.0.0.1", port)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_two_tasks_parallel_servers(model_dir, tmp_path):
    out = tmp_path / "out"
    argv = [
        "passkey,ppl",
        "--serve",
        model_dir,
        "--methods",
        "mesa,stock",
        "--mesa-config",
        '{"no_such_key": 1}',
        "--parallel-servers",
        "2",
        "--train-len",
        str(TRAIN_LEN),
        "--lengths",
        "32,64",
        "--samples",
        "1",
        "--text",
        str(_text_file(tmp_path / "docs.txt")),
        "--server-args",
        "--max-num-batched-tokens 512 --max-num-seqs 8",
        "--server-timeout",
        "300",
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 2  # mesa did not start
    for task in ("passkey", "ppl"):
        res = json.loads((out / task / "results.json").read_text())
        assert (out / task / "table.md").stat().st_size > 0
        assert (out / task / f"{task}.png").stat().st_size > 0
        mesa, stock = res["methods"]
        assert mesa["name"] == "mesa" and "no_such_key" in mesa["error"]
        assert stock["name"] == "stock" and stock["error"] is None
        assert [p["length"] for p in stock["points"]] == [32, 64]
        assert all(p["n"] == 1 and p["errors"] == 0 for p in stock["points"])
        assert res["meta"]["tasks"] == ["passkey", "ppl"] and res["meta"]["parallel_servers"] == 2
        times = {t["method"]: t for t in res["meta"]["timings"]}
        assert times["stock"]["server_start_s"] > 0 and set(times["stock"]["eval_s"]) == {
            "passkey",
            "ppl",
        }
        assert times["mesa"]["error"] and times["mesa"]["server_start_s"] is None
        # the finished method was saved as soon as it finished; the tables rebuild from it
        snap = json.loads((out / task / "partial" / "stock.json").read_text())
        assert snap["methods"][0]["points"] == stock["points"]
        (out / task / "results.json").unlink()
        assert cli.main(["report", str(out / task)]) == 0
        again = json.loads((out / task / "results.json").read_text())
        assert [m["name"] for m in again["methods"]] == ["stock"]
        assert again["methods"][0]["points"] == stock["points"]
    assert (out / "server-mesa.log").stat().st_size > 0
    port = int(stock["endpoint"].rsplit(":", 1)[1].split("/")[0])
    assert not port_open("127.0.0.1", port)


def test_unreachable_endpoint_is_one_line_exit_2(capsys, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    code = cli.main(["passkey", "--base-url", url, "--lengths", "64", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot reach endpoint") and err.count("\n") == 1
