"""``mesa-vllm tune``: candidates, scoring and ranking, the written config and scores file,
and the printed serve line as a shell and vLLM's own argument parser read it.

Results are hand-made in the structure ``mesa-vllm eval`` writes: points reduced from sample
records by ``harness.aggregate``, launches from ``methods.build_launch``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesa_vllm import tune
from mesa_vllm.config import MesaConfig
from mesa_vllm.eval import harness, methods

pytestmark = pytest.mark.unit

L = 256
MAX_LEN = 2056
BASE = {"first_chunk": 32, "last_chunk": 64, "max_remainder": 32, "stair_width": 64}
CTX = methods.ServeContext("/models/toy", L, MAX_LEN, mesa_config=BASE)
TOY = Path(__file__).resolve().parents[2] / "mesa_vllm" / "assets" / "models" / "passkey-llama"


def _records(task: str, correct: dict, samples: int = 4) -> list[dict]:
    """Sample records: ``correct[length]`` (or ``correct[(length, depth)]``) of ``samples``
    right; a value of None: every sample skipped."""
    recs = []
    for key, k in correct.items():
        length, depth = key if isinstance(key, tuple) else (key, None)
        for i in range(samples):
            rec = {
                "length": length,
                "depth": depth,
                "index": i,
                "key": "12345",
                "prompt_tokens": length - 3,
                "error": None,
                "skipped": "prompt too long" if k is None else None,
            }
            if k is not None:
                rec.update(answer="x", correct=i < k)
            recs.append(rec)
    return recs


def _entry(name: str, task: str, correct: dict, error: str | None = None) -> dict:
    launch = methods.build_launch(name, CTX, cpu=False, extra=("--max-num-seqs", "4"))
    entry = {"name": name, "launch": launch.describe(), "log": f"server-{name}.log"}
    if error:
        return {**entry, "error": error, "points": []}
    points = harness.aggregate(task, _records(task, correct))
    return {**entry, "error": None, "max_model_len": MAX_LEN, "points": points}


def _results(task: str, entries: list[dict], lengths: list[int]) -> dict:
    meta = {"train_len": L, "lengths": lengths, "samples": 4, "model": "/models/toy"}
    return {"task": task, "meta": meta, "methods": entries}


def test_rank_by_mean_then_min_then_order_errors_last():
    res = _results(
        "passkey",
        [
            _entry("mesa", "passkey", {512: 2, 1024: 2}),  # mean .5, min .5
            _entry("mesa@stair_width=auto", "passkey", {512: 4, 1024: 0}),  # mean .5, min 0
            _entry("mesa@stair_width=3", "passkey", {512: 1, 1024: 3}),  # mean .5, min .25
            _entry("mesa-leaky-rerope", "passkey", {}, error="ServerError: boom\nlog tail"),
            _entry("mesa@stair_width=8", "passkey", {512: 2, 1024: 2}),  # same as mesa
            _entry("mesa@stair_width=9", "passkey", {512: 3, 1024: None}),  # 0.75 and 0 (skipped)
        ],
        [512, 1024],
    )
    names = [m["name"] for m in res["methods"]]
    # the error first in candidate order: it must still rank last
    order = ["mesa-leaky-rerope", *[n for n in names if n != "mesa-leaky-rerope"]]
    ranked = tune.rank(tune.scores({"passkey": res}, order))
    assert [s.name for s in ranked] == [
        "mesa",
        "mesa@stair_width=8",
        "mesa@stair_width=3",
        "mesa@stair_width=auto",
        "mesa@stair_width=9",
        "mesa-leaky-rerope",
    ]
    by = {s.name: s for s in ranked}
    assert by["mesa@stair_width=3"].cells == {("passkey", 512): 0.25, ("passkey", 1024): 0.75}
    assert (by["mesa@stair_width=3"].mean, by["mesa@stair_width=3"].min) == (0.5, 0.25)
    assert by["mesa@stair_width=9"].cells[("passkey", 1024)] is None
    assert (by["mesa@stair_width=9"].mean, by["mesa@stair_width=9"].min) == (0.375, 0.0)
    assert by["mesa-leaky-rerope"].mean is None and by["mesa-leaky-rerope"].error == (
        "ServerError: boom"
    )
    text = tune.table(ranked, L)
    lines = text.splitlines()
    assert lines[0].split() == ["candidate", "2x", "4x", "mean", "min"]
    assert lines[1].split() == ["*", "mesa", "0.50", "0.50", "0.50", "0.50"]
    assert not any(line.startswith("*") for line in lines[2:])
    assert lines[-1].split() == ["mesa-leaky-rerope", "error"]


def test_needle_cells_are_the_mean_over_depths_and_tasks_pool():
    pk = _results("passkey", [_entry("mesa", "passkey", {512: 4})], [512])
    nd = _results(
        "needle", [_entry("mesa", "needle", {(512, 0.0): 4, (512, 1.0): 1})], [512]
    )  # depth 0: 4/4, depth 1: 1/4 -> 0.625
    (s,) = tune.scores({"passkey": pk, "needle": nd}, ["mesa"])
    assert s.cells == {("passkey", 512): 1.0, ("needle", 512): 0.625}
    assert s.mean == pytest.approx(0.8125) and s.min == 0.625
    header = tune.table([s], L).splitlines()[0].split()
    assert header == ["candidate", "passkey", "2x", "needle", "2x", "mean", "min"]


def test_decide_writes_the_chosen_launch_config_and_a_consistent_scores_file(tmp_path):
    res = _results(
        "passkey",
        [
            _entry("mesa", "passkey", {512: 1, 1024: 1}),
            _entry("mesa-leaky-rerope", "passkey", {512: 4, 1024: 3}),
            _entry("mesa@stair_width=auto", "passkey", {512: 4, 1024: 2}),
        ],
        [512, 1024],
    )
    names = [m["name"] for m in res["methods"]]
    path = tmp_path / "cfg" / "tuned.json"
    d = tune.decide({"passkey": res}, names, path, "mesa-vllm tune X", {"model": "X"})
    assert d.best.name == "mesa-leaky-rerope" and d.config_path == path
    written = json.loads(path.read_text())
    # exactly the --additional-config its server got: L, the base settings, the variant
    assert written == {
        "mesa": {
            "train_len": 256,
            "first_chunk": 32,
            "last_chunk": 64,
            "max_remainder": 32,
            "stair_width": 64,
            "pe": "leaky_rerope",
            "chunked_prefill": True,
        }
    }
    assert MesaConfig.from_additional_config(written).pe == "leaky_rerope"
    assert d.max_model_len == MAX_LEN
    sc = json.loads((tmp_path / "cfg" / "tuned.json.scores.json").read_text())
    assert d.scores_path == tmp_path / "cfg" / "tuned.json.scores.json"
    assert sc["chosen"] == "mesa-leaky-rerope" and sc["config"] == str(path)
    assert sc["command"] == "mesa-vllm tune X" and sc["max_model_len"] == MAX_LEN
    assert [r["candidate"] for r in sc["ranking"]] == [
        "mesa-leaky-rerope",
        "mesa@stair_width=auto",
        "mesa",
    ]
    top = sc["ranking"][0]
    assert top["scores"] == {"passkey": {"512": 1.0, "1024": 0.75}}
    assert top["mean"] == 0.875 and top["min"] == 0.75 and top["config"] == written
    auto = sc["ranking"][1]["config"]["mesa"]
    assert auto["stair_width"] == "auto" and "pe" not in auto


def test_nothing_evaluated_writes_no_config(tmp_path):
    res = _results("passkey", [_entry("mesa", "passkey", {}, error="ServerError: x")], [512])
    path = tmp_path / "tuned.json"
    d = tune.decide({"passkey": res}, ["mesa"], path, "cmd", {})
    assert d.best is None and d.config_path is None and not path.exists()
    sc = json.loads(d.scores_path.read_text())
    assert sc["chosen"] is None and sc["ranking"][0]["error"] == "ServerError: x"


def test_candidates_must_be_mesa_backend_methods():
    assert tune.parse_candidates("mesa, mesa@stair_width=auto,self-extend@group_size=4") == [
        "mesa",
        "mesa@stair_width=auto",
        "self-extend@group_size=4",
    ]
    for bad in ("mesa,yarn", "stock-raised"):
        with pytest.raises(ValueError, match="not served by the Mesa backend") as exc:
            tune.parse_candidates(bad)
        assert "mesa-leaky-rerope" in str(exc.value) and "self-extend" in str(exc.value)
    with pytest.raises(ValueError, match="unknown method"):
        tune.parse_candidates("mesa,nope")


def test_default_grid_and_duplicates():
    assert tune.default_candidates(8192) == [
        "mesa",
        "mesa@stair_width=auto",
        "mesa@stair_width=2048",
        "mesa-leaky-rerope",
        "mesa@split=fixed@middle_chunk=1024@near_window=512",
    ]
    # the narrow grid follows the base's Lc and stays inside L - F
    assert tune.default_candidates(256, {"first_chunk": 32, "last_chunk": 64})[-1] == (
        "mesa@split=fixed@middle_chunk=128@near_window=64"
    )
    assert tune.default_candidates(256, {"first_chunk": 32, "last_chunk": 200})[-1] == (
        "mesa@split=fixed@middle_chunk=224@near_window=200"
    )
    # the toy model's base already has E = 64 = L // 4: measured once
    kept, dropped = tune.dedupe(tune.default_candidates(L, CTX.mesa_config), CTX)
    narrow = "mesa@split=fixed@middle_chunk=128@near_window=64"
    assert kept == ["mesa", "mesa@stair_width=auto", "mesa-leaky-rerope", narrow]
    assert dropped == {"mesa@stair_width=64": "mesa"}


def test_printed_serve_line_gives_vllm_the_config_and_a_path_would_not(tmp_path):
    cfg = tmp_path / "my dir" / "tuned.json"
    setting = {"mesa": {"train_len": 256, "stair_width": "auto"}}
    tune.write_config(cfg, setting)
    line = tune.serve_command("/models/a b", cfg, 1032)
    assert line.startswith("mesa-vllm serve '/models/a b' --attention-backend mesa ")
    assert line.endswith(" --max-model-len 1032")
    # what a shell hands the program: replace the program by one that prints its argv
    show = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    argv = json.loads(
        subprocess.run(
            ["bash", "-c", line.replace("mesa-vllm", show, 1)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert argv[:2] == ["serve", "/models/a b"]
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    parsed = parser.parse_args(argv[2:])
    assert parsed.additional_config == setting and parsed.max_model_len == 1032
    # vLLM 0.26 does not open a file path: it keeps the path as a string
    assert parser.parse_args(["--additional-config", str(cfg)]).additional_config == str(cfg)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--candidates", "mesa,yarn"], "not served by the Mesa backend"),
        (["--base-url", "http://127.0.0.1:1"], "not --base-url"),
        (["--server-args", "--attention-backend FLASH_ATTN"], "may not set --attention-backend"),
    ],
)
def test_bad_arguments_exit_2_before_any_server(extra, message, tmp_path, capsys):
    assert tune.main([str(TOY), "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_ppl_is_not_a_tune_task(capsys):
    assert tune.main([str(TOY), "--tasks", "ppl"]) == 2
    assert "tasks are passkey, needle" in capsys.readouterr().err
