"""The eval harness against one real stock vLLM server (CPU, random-weight tiny Llama).

One server (train_len 64, max-model-len 512) serves: passkey at 2 lengths x 2 samples (both
past the trained length: the shortest passkey prompt is 65 tokens with the bundled tokenizer)
and perplexity at 1 length inside it, both through the CLI's ``--base-url`` mode; then the
server is stopped and must be gone (port closed, process gone).  Random weights: accuracy is
only checked to be in [0, 1].
"""

from __future__ import annotations

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


def test_unreachable_endpoint_is_one_line_exit_2(capsys, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    code = cli.main(["passkey", "--base-url", url, "--lengths", "64", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot reach endpoint") and err.count("\n") == 1
