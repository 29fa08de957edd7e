"""Prefix caching with ``split: fixed`` is exact: two real servers (`mesa-vllm serve`, CPU,
HTTP), one with vLLM's prefix caching on (its default) and one with it off, get the same
requests in the same order and must answer them alike.

The toy model has L = 64 with MESA_SMALL (F = 8, Lc = 24): C = 56, 16-token blocks.  vLLM
serves a request with ``prompt_logprobs`` without reading the prefix cache (it still writes
it), so the cache-reading requests are compared on their greedy tokens and the logprobs of
their generated tokens (which read every cached key), and the prompt logprobs separately.
Tolerance: the cached and the uncached server run the same kernels on steps of different
shapes, so the logprobs are compared to 1e-4 (fp32), the tokens exactly.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import MESA_SMALL, TRAIN_LEN, cli_server
from oracle import dense_greedy, dense_model_logits

pytestmark = pytest.mark.e2e

MESA_FIXED = {**MESA_SMALL, "split": "fixed"}
MAX_LEN = 16 * TRAIN_LEN
ATOL = 1e-4
ORACLE_ATOL = 2e-3
N_NEW = 8


def _server(model, tmp_path_factory, name: str, caching: bool):
    log = tmp_path_factory.mktemp(name) / "server.log"
    args = [
        "--attention-backend",
        "mesa",
        "--max-model-len",
        str(MAX_LEN),
        "--additional-config",
        json.dumps({"mesa": MESA_FIXED}),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.12",
        "--block-size",
        "16",
        # 80 blocks of 16 tokens and 128-token steps: chunked prefill everywhere, and a
        # small cache for concurrent long requests (test_concurrent_requests)
        "--num-gpu-blocks-override",
        "80",
        "--max-num-batched-tokens",
        "128",
        "--enable-prefix-caching" if caching else "--no-enable-prefix-caching",
    ]
    return cli_server(model, args, log)


@pytest.fixture(scope="module")
def servers(tiny_llama, tmp_path_factory):
    on = _server(tiny_llama, tmp_path_factory, "cache-on", True)
    off = _server(tiny_llama, tmp_path_factory, "cache-off", False)
    try:
        with ThreadPoolExecutor(2) as pool:  # start-ups overlap
            for f in [pool.submit(s.start) for s in (on, off)]:
                f.result()
        yield on, off
    finally:
        on.stop()
        off.stop()


def _post(server, body: dict) -> dict:
    req = urllib.request.Request(
        server.base_url + "/completions",
        data=json.dumps({"model": "tiny", **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _generate(server, prompt: list[int], n_new: int = N_NEW) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their logprobs (the request reads the prefix cache)."""
    r = _post(
        server,
        {
            "prompt": prompt,
            "max_tokens": n_new,
            "temperature": 0,
            "logprobs": 1,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
    )
    lp = r["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    return tokens, torch.tensor(lp["token_logprobs"], dtype=torch.float64)


def _prompt_logprobs(server, prompt: list[int]) -> torch.Tensor:
    """Logprobs of prompt tokens 1..T-1 (``echo``: vLLM asks for prompt logprobs)."""
    r = _post(
        server, {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0}
    )
    lps = r["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)]
    return torch.tensor(lps, dtype=torch.float64)


def _metric(server, name: str) -> float:
    root = server.base_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_total") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _counted(server, queries_before: float, n_tokens: int) -> float:
    """vllm:prefix_cache_hits once the request of ``n_tokens`` is in vllm:prefix_cache_queries
    (the counters are recorded as the engine's outputs are handled, next to the response)."""
    deadline = time.monotonic() + 10
    while _metric(server, "vllm:prefix_cache_queries") < queries_before + n_tokens:
        assert time.monotonic() < deadline, "prefix cache queries were not counted"
        time.sleep(0.05)
    return _metric(server, "vllm:prefix_cache_hits")


def _same(servers, prompt: list[int], what: str) -> list[int]:
    """The request on both servers: equal greedy tokens, logprobs within ATOL."""
    on, off = servers
    tok_on, lp_on = _generate(on, prompt)
    tok_off, lp_off = _generate(off, prompt)
    assert tok_on == tok_off, f"{what}: greedy tokens differ"
    err = float((lp_on - lp_off).abs().max())
    assert err <= ATOL, f"{what}: generated-token logprobs differ by {err:.2e}"
    return tok_on


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [0] + [rng.randrange(3, 450) for _ in range(n - 1)]


def test_repeated_prompt_hits_the_cache(servers):
    on, _ = servers
    prompt = _prompt(300, 1)  # stable prefix 232: 14 cacheable blocks
    _same(servers, prompt, "first")
    queries = _metric(on, "vllm:prefix_cache_queries")
    hits = _counted(on, 0, 0)
    _same(servers, prompt, "repeat")
    assert _counted(on, queries, len(prompt)) - hits == 14 * 16


def test_shared_long_prefix_different_questions(servers):
    doc = _prompt(250, 2)
    for i, n in enumerate((30, 45)):
        _same(servers, doc + _prompt(n, 20 + i)[1:], f"question {i}")


def test_conversation_growing_across_L(servers):
    turn = _prompt(40, 3)  # turn 1 < L
    for i, extra in enumerate((60, 200)):  # turn 2 > L, turn 3 longer
        reply = _same(servers, turn, f"turn {i + 1}")
        turn = turn + reply + _prompt(extra, 30 + i)[1:]
    _same(servers, turn, "turn 3")


def test_shorter_prompt_after_longer_one(servers):
    """The long prompt caches middle-chunk tokens that a shorter prompt over L computes as
    last-chunk (stair) tokens: T = 70 and T = 79 may hit only their first chunk (nothing, in
    16-token blocks), T = 100 [0, 64), T = 60 (< L) [0, 48)."""
    on, _ = servers
    long = _prompt(400, 4)
    _same(servers, long, "long")  # caches [0, 336): its stable prefix 344, block-aligned
    for n, hit in ((70, 0), (79, 0), (100, 64), (60, 48)):
        queries = _metric(on, "vllm:prefix_cache_queries")
        hits = _counted(on, 0, 0)
        _same(servers, long[:n], f"prefix of {n}")
        assert _counted(on, queries, n) - hits == hit, f"prefix of {n}: cache hits"


def test_concurrent_requests(servers):
    """A shared 500-token document and three long questions sent at once: mixed batches,
    prefill in 128-token steps, a 1280-token KV cache (prefix-cache blocks evicted and
    re-shared).  (Preemption is covered without prefix caching in test_mesa_exactness.py;
    over HTTP vLLM 0.26 admitted these requests without preempting.)"""
    doc = _prompt(500, 5)
    prompts = [doc + _prompt(n, 50 + i)[1:] for i, n in enumerate((300, 340, 320))]
    with ThreadPoolExecutor(6) as pool:
        got = {
            (name, i): pool.submit(_generate, server, p, 24)
            for name, server in zip(("on", "off"), servers, strict=True)
            for i, p in enumerate(prompts)
        }
        got = {k: f.result() for k, f in got.items()}
    for i in range(len(prompts)):
        (tok_on, lp_on), (tok_off, lp_off) = got["on", i], got["off", i]
        assert tok_on == tok_off, f"question {i}: greedy tokens differ"
        assert float((lp_on - lp_off).abs().max()) <= ATOL, f"question {i}: logprobs differ"


def test_prompt_logprobs_on_equal_off_and_oracle(servers, tiny_llama):
    on, off = servers
    prompt = _prompt(300, 1)  # cached by test_repeated_prompt_hits_the_cache
    got_on, got_off = _prompt_logprobs(on, prompt), _prompt_logprobs(off, prompt)
    assert float((got_on - got_off).abs().max()) <= ATOL
    logits = dense_model_logits(tiny_llama, prompt, mesa=MESA_FIXED).to(torch.float64)
    want = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert float((got_on - want).abs().max()) <= ORACLE_ATOL
    # and the cache-reading greedy continuation equals the oracle's
    assert _generate(on, prompt)[0] == dense_greedy(tiny_llama, tuple(prompt), N_NEW, MESA_FIXED)


def test_preemption_with_prefix_caching_equals_the_oracle(tiny_llama):
    """An in-process engine with prefix caching on (``split: fixed``), prefill in 100-token
    steps and 80 KV blocks of 16 tokens: three long questions on one 100-token document at
    once share its blocks and force a preemption (the preempted request's blocks are freed
    and it is recomputed, reading what the cache still holds).  Every continuation must
    equal the dense greedy one."""
    from conftest import mesa_engine_kwargs
    from vllm import LLM, SamplingParams

    kw = mesa_engine_kwargs(tiny_llama, MAX_LEN, MESA_FIXED, max_num_seqs=8,
                            max_num_batched_tokens=100, num_gpu_blocks_override=80,
                            enable_prefix_caching=True, disable_log_stats=False)  # fmt: skip
    llm = LLM(**kw)
    try:
        sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        doc = _prompt(100, 11)
        prompts = [doc + _prompt(n, 60 + i)[1:] for i, n in enumerate((550, 560, 540))]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        metrics = {m.name: getattr(m, "value", 0) for m in llm.get_metrics()}
    finally:
        del llm
    assert metrics.get("vllm:num_preemptions", 0) > 0, "the KV cache forced no preemption"
    assert metrics.get("vllm:prefix_cache_hits", 0) > 0, "no prefix-cache hit"
    for p, o in zip(prompts, outs, strict=True):
        want = dense_greedy(tiny_llama, tuple(p), 40, MESA_FIXED)
        assert list(o.outputs[0].token_ids) == want, f"T={len(p)}"


def test_narrow_middle_chunks_with_prefix_caching_equal_the_oracle(tiny_llama):
    """``middle_chunk`` C = 16 < L - F = 56, prefix caching on, one request after the other
    in an in-process engine (prefill in 100-token steps): a document and two questions on it,
    a prompt within L after them (it may reuse only F + C = 24 tokens: one 16-token block;
    the long prompt's tokens 24.. sit in middle chunks 1.. and see other keys than its
    causal ones), and a conversation growing across L.  Every greedy continuation and its
    logprobs equal the dense oracle's, and the hits are what the stable prefixes allow:
    question 2 (T = 319: (319 - 8 - 24) // 16 = 17 middle chunks, stable prefix
    8 + 17 * 16 = 280) reuses the 17 whole blocks question 1 cached, 272 tokens."""
    from conftest import mesa_engine_kwargs
    from vllm import LLM, SamplingParams

    mesa = {**MESA_FIXED, "middle_chunk": 16}
    kw = mesa_engine_kwargs(tiny_llama, MAX_LEN, mesa, max_num_batched_tokens=100,
                            enable_prefix_caching=True, disable_log_stats=False)  # fmt: skip
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=0)

    def ask(llm, prompt: list[int]) -> tuple[list[int], int]:
        """(greedy tokens, prompt tokens read from the prefix cache), checked against the
        oracle."""
        res = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        out = res.outputs[0]
        got = list(out.token_ids)
        assert got == dense_greedy(tiny_llama, tuple(prompt), N_NEW, mesa), f"T={len(prompt)}"
        logits = dense_model_logits(tiny_llama, prompt + got, mesa=mesa, prompt_len=len(prompt))
        want = torch.log_softmax(logits.double(), -1)[len(prompt) - 1 : -1]
        want = want[torch.arange(len(got)), torch.tensor(got)]
        lps = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, got, strict=True)])
        err = float((lps.double() - want).abs().max())
        assert err <= ORACLE_ATOL, f"T={len(prompt)}: logprobs off by {err:.2e}"
        return got, res.num_cached_tokens

    try:
        doc = _prompt(300, 21)
        assert ask(llm, doc + _prompt(20, 31)[1:])[1] == 0
        assert ask(llm, doc + _prompt(20, 32)[1:])[1] == 272
        assert ask(llm, doc[:50])[1] == 16  # within L: F + C = 24 tokens, one whole block
        # a conversation: turn 1 (40 tokens) caches [0, 16); turn 2 (198 tokens: 10 middle
        # chunks, stable prefix 168) reads it and caches [0, 160); turn 3 (406) reads that
        turn, cached = _prompt(40, 41), []
        for extra in (150, 200, 0):
            out, hit = ask(llm, turn)
            cached.append(hit)
            turn = turn + out + _prompt(extra + 1, 42 + extra)[1:]
        assert cached == [0, 16, 160]
    finally:
        del llm
