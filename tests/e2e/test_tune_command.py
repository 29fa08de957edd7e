"""``mesa-vllm tune`` end to end on the bundled 256-token passkey model (CPU: 3 to 5 min
on 2 shared cores, three server starts).

The real command measures two candidates (``mesa`` with the model's own settings, and
``mesa@stair_width=auto``) at 4x L on 4 passkey samples, one server each; then the written
config is served with the exact ``mesa-vllm serve`` line the command printed (through a shell,
so ``"$(cat FILE)"`` is expanded as a user's shell would) and answers a 4x prompt.  The
server's own log must show the written settings, so a config that vLLM dropped or misread
would fail the test."""

from __future__ import annotations

import ast
import json
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mesa_vllm.eval import data, harness, methods
from mesa_vllm.eval.server import LocalServer
from mesa_vllm.testing.cases import PASSKEY_MODEL_MESA

pytestmark = pytest.mark.e2e

MODEL = Path(__file__).resolve().parents[2] / "mesa_vllm" / "assets" / "models" / "passkey-llama"
L = 256
CANDIDATES = ["mesa", "mesa@stair_width=auto"]
# a small scheduler budget: the CPU engine's start-up warm-up runs a batch of this size
FAST = "--max-num-batched-tokens 256 --max-num-seqs 4"


def _expected(name: str) -> dict:
    """The Mesa settings candidate ``name`` is served with, spelled out independently."""
    cfg = {"train_len": L, **PASSKEY_MODEL_MESA}
    if name == "mesa@stair_width=auto":
        cfg["stair_width"] = "auto"
    return {"mesa": cfg}


class ShellServer(LocalServer):
    """A LocalServer started as a shell command line, plus its host/port/name flags."""

    def __init__(self, line: str, log: Path) -> None:
        cpu = methods.platform_defaults(methods.is_cpu_install())
        super().__init__(str(MODEL), cpu.args, cpu.env, log, served_name="tuned", timeout=400)
        self.line = line

    def command(self) -> list[str]:
        extra = ["--served-model-name", self.served_name, "--host", self.host]
        extra += ["--port", str(self.port), *self.args, *shlex.split(FAST)]
        return ["bash", "-c", f"exec {self.line} {shlex.join(extra)}"]


def test_tune_writes_a_config_that_serves(tmp_path):
    exe = Path(sys.executable).parent / "mesa-vllm"
    cfg = tmp_path / "tuned.json"
    argv = [
        str(exe), "tune", str(MODEL), "--candidates", ",".join(CANDIDATES),
        "--multiples", "4", "--samples", "4", "--mesa-config", json.dumps(PASSKEY_MODEL_MESA),
        "--server-args", FAST, "--server-timeout", "400", "--out", str(tmp_path / "out"),
        "--write", str(cfg), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    # the scores file: its ranking follows its own numbers
    sc = json.loads((tmp_path / "tuned.json.scores.json").read_text())
    ranking = sc["ranking"]
    assert sorted(r["candidate"] for r in ranking) == sorted(CANDIDATES)
    for r in ranking:
        vals = list(r["scores"]["passkey"].values())
        assert list(r["scores"]["passkey"]) == [str(4 * L)] and r["error"] is None
        assert r["mean"] == pytest.approx(sum(vals) / len(vals)) and r["min"] == min(vals)
    keys = [(-r["mean"], -r["min"], CANDIDATES.index(r["candidate"])) for r in ranking]
    assert keys == sorted(keys)
    chosen = ranking[0]["candidate"]
    assert sc["chosen"] == chosen and sc["train_len"] == L and sc["config"] == str(cfg)

    # the config: exactly the chosen candidate's settings, nothing else in the file
    written = json.loads(cfg.read_text())
    assert written == _expected(chosen) == ranking[0]["config"]
    # each candidate's eval results say the same numbers
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    for m in res["methods"]:
        (p,) = m["points"]
        mine = next(r for r in ranking if r["candidate"] == m["name"])
        assert mine["scores"]["passkey"][str(p["length"])] == p["accuracy"]

    # the printed table marks the chosen one; the printed serve line works as printed
    assert re.search(rf"^\*\s+{re.escape(chosen)}\s", done.stdout, re.M), done.stdout
    (line,) = [s for s in done.stdout.splitlines() if s.startswith("mesa-vllm serve ")]
    assert f'--additional-config "$(cat {shlex.quote(str(cfg))})"' in line
    max_len = int(line.rsplit("--max-model-len ", 1)[1])
    assert max_len == sc["max_model_len"] >= 4 * L
    log = tmp_path / "serve.log"
    with ShellServer(str(exe) + line[len("mesa-vllm") :], log) as srv:
        ep = harness.connect(srv.base_url, "tuned")
        assert ep.max_model_len == max_len
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(MODEL))
        sample = data.passkey_sample(tok, 4 * L, rng=random.Random(7))
        resp = ep.client.completions.create(
            model="tuned", prompt=sample.prompt, max_tokens=8, temperature=0.0
        )
        assert resp.usage.prompt_tokens > 3 * L and resp.choices[0].text.strip()
    text = log.read_text()
    m = re.search(r"Mesa configuration: (\{.*?\}); max_model_len=(\d+)", text)
    assert m, text[-3000:]
    served = ast.literal_eval(m.group(1))
    assert {k: served[k] for k in written["mesa"]} == written["mesa"]
    assert int(m.group(2)) == max_len
