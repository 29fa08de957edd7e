"""The real server: `mesa-vllm serve MODEL --attention-backend mesa` started from a shell,
spoken to over HTTP with the openai client."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request

import pytest
from conftest import MESA_SMALL, TRAIN_LEN, cli_server

pytestmark = pytest.mark.e2e

MAX_LEN = 32 * TRAIN_LEN


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = [
        "--attention-backend",
        "mesa",
        "--max-model-len",
        str(MAX_LEN),
        "--additional-config",
        json.dumps({"mesa": MESA_SMALL}),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.12",
    ]
    srv = cli_server(tiny_llama, args, log)
    with srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


def _long_prompt_ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [0] + [rng.randrange(3, 450) for _ in range(n - 1)]


def test_health_and_models(server):
    root = server.base_url.removesuffix("/v1")
    assert _get(root + "/health")[0] == 200
    status, body = _get(server.base_url + "/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny"]


def test_layers_run_mesa_backend(server):
    text = server.log_path.read_text(errors="replace")
    assert "attention layers use MesaAttentionBackend" in text
    assert "Mesa configuration:" in text


def test_completion(client):
    r = client.completions.create(
        model="tiny", prompt="The pass key is", max_tokens=5, temperature=0
    )
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens >= 1


def test_completion_stream(client):
    chunks = list(
        client.completions.create(
            model="tiny", prompt="The grass is", max_tokens=6, temperature=0, stream=True
        )
    )
    assert len(chunks) >= 2
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat(client):
    msgs = [{"role": "user", "content": "What is the pass key?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=5, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == r.choices[0].message.content


@pytest.mark.parametrize("multiple", [2, 16])
def test_prompt_longer_than_training_length(client, multiple):
    ids = _long_prompt_ids(multiple * TRAIN_LEN)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logprobs=1)
    assert r.usage.prompt_tokens == multiple * TRAIN_LEN
    assert r.usage.completion_tokens == 8
    lps = r.choices[0].logprobs.token_logprobs
    assert all(lp is not None and lp > -20 for lp in lps)  # finite, not NaN garbage


def test_greedy_is_deterministic_across_requests(client):
    ids = _long_prompt_ids(5 * TRAIN_LEN, seed=3)
    a = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    b = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def _post_raw(base_url: str, path: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(
        base_url + path, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


BAD_REQUESTS = {
    "prompt longer than max_model_len": (
        json.dumps({"model": "tiny", "prompt": [5] * (MAX_LEN + 10), "max_tokens": 4}).encode(),
        "maximum context length",
    ),
    "empty prompt": (
        json.dumps({"model": "tiny", "prompt": "", "max_tokens": 4}).encode(),
        "prompt",
    ),
    "max_tokens past the limit": (
        json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": MAX_LEN * 4}).encode(),
        "max_tokens",
    ),
    "negative max_tokens": (
        json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": -1}).encode(),
        "max_tokens",
    ),
    "malformed JSON": (b'{"model": "tiny", "prompt": "hi", ', "JSON"),
    "non-UTF-8 bytes": (b'{"model": "tiny", "prompt": "\xff\xfe\xfa", "max_tokens": 2}', ""),
    "unknown model": (json.dumps({"model": "nope", "prompt": "hi"}).encode(), "nope"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_and_server_keeps_serving(server, client, case):
    body, reason = BAD_REQUESTS[case]
    status, text = _post_raw(server.base_url, "/completions", body)
    assert 400 <= status < 500, f"{case}: HTTP {status}: {text[:300]}"
    assert reason.lower() in text.lower(), f"{case}: reason not in {text[:300]}"
    assert server.alive()
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
