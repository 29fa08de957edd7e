"""Time to first token of many questions on one long document, with and without prefix caching.

    python benchmarks/prefix_cache_ttft.py --model DIR|llama2-7b-shape --max-model-len N
        [--doc-lens 32768,131072] [--questions 8] [--max-tokens 16] [--text FILE]
        [--configs "FLASH_ATTN+cache,mesa fixed+cache,mesa fixed,mesa dynamic"]
        [--server-args "..."] [--mesa-config JSON] [--budget-seconds S] [--concurrent]
        [--out DIR]

The workload of one document and many questions on it: per document length D, a document of
D tokens (from --text, tokenized by the model's tokenizer, else seeded pseudo-random token
ids; every length starts differently, so no length reuses another's cached blocks), then Q
questions, each the document plus a distinct ~32-token suffix, sent one at a time as token-id
lists to /v1/completions (greedy, stream, ``max_tokens`` tokens, EOS ignored).  TTFT is the
client's time (``time.perf_counter``) from sending a request to its first streamed token.
Question 1 is cold (nothing cached), questions 2..Q are warm (their median is reported).
With --concurrent, questions 2..Q are sent all at once after question 1 has finished (users
asking at the same time about a document one of them sent first); each TTFT still runs from
its own request's send.

Each configuration gets its own ``mesa-vllm serve`` server (benchmarks/serve_load.py's
``server_launch`` and ``mesa_serve_server``), started and stopped here:

- ``FLASH_ATTN+cache``: stock vLLM (``stock-raised``; on a CPU install the CPU build's own
  backend), ``--enable-prefix-caching``;
- ``mesa fixed+cache``: Mesa with ``{"split": "fixed"}`` on --mesa-config,
  ``--enable-prefix-caching`` (hits bounded by each request's stable prefix);
- ``mesa fixed``: the same, ``--no-enable-prefix-caching``;
- ``mesa dynamic``: Mesa's default split, ``--no-enable-prefix-caching`` (caching is refused
  with the dynamic split); --mesa-config without ``middle_chunk`` (a fixed-split width).

``--model llama2-7b-shape``: the Llama-2-7B shape (L = 4096) with dummy bf16 weights, made by
benchmarks/serve_load.py's ``dummy_7b`` (its flags go before --server-args); the documents
are then random token ids (no --text: dummy weights read nothing), and with random weights
greedy tokens are near ties, so the top-2 gaps say whether a differing token is one.

The server's ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` counters (tokens) are
read from /metrics before and after each document's questions.  The greedy tokens of
``mesa fixed+cache`` are compared with ``mesa fixed``'s, question by question.
--budget-seconds: the time left is shared among the configurations still to run; a document
length whose estimated time does not fit its share is not started (the table says so).
Writes to --out: table.md, points.json, servers/<config>.log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shlex
import signal
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REF, FIXED_CACHE = "FLASH_ATTN+cache", "mesa fixed+cache"
FIXED, DYNAMIC = "mesa fixed", "mesa dynamic"
# name -> (serve_load backend, Mesa split or None, prefix caching)
CONFIGS = {REF: ("FLASH_ATTN", None, True), FIXED_CACHE: ("mesa", "fixed", True),
           FIXED: ("mesa", "fixed", False), DYNAMIC: ("mesa", "dynamic", False)}  # fmt: skip
METRICS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
QUESTION_LEN = 32
TOPICS = ["the main argument", "the first example", "the error handling", "the default value",
          "the return type", "the last section", "the naming rules", "the speed notes"]  # fmt: skip


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- pure helpers


@dataclass
class Point:
    config: str
    doc_len: int
    status: str = "pending"  # ok | skipped | budget | failed | server failed
    reason: str = ""
    seconds: float | None = None  # all Q questions
    ttft_ms: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    cache: dict[str, float] = field(default_factory=dict)  # counter deltas
    # per question, per generated token: log p of the chosen token minus that of the
    # runner-up (None where the server sent no top-2), to tell a near-tie from a divergence
    gaps: list[list[float | None]] = field(default_factory=list)


def parse_metrics(text: str, names=METRICS) -> dict[str, float]:
    """Prometheus text -> {name: value summed over label sets}; a counter ``NAME`` is
    exposed as ``NAME_total``."""
    out = {n: 0.0 for n in names}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1).removesuffix("_total") in out:
            out[m.group(1).removesuffix("_total")] += float(m.group(3))
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k.split(":")[-1].removeprefix("prefix_cache_"): after[k] - before.get(k, 0.0)
            for k in after}  # fmt: skip


def cold_warm(p: Point) -> tuple[float | None, float | None]:
    """TTFT of question 1 and the median of questions 2..Q (ms)."""
    t = p.ttft_ms
    return (t[0] if t else None), (statistics.median(t[1:]) if len(t) > 1 else None)


def equal_questions(a: Point | None, b: Point | None) -> tuple[int, int] | None:
    """(questions with identical greedy tokens, questions compared), both points finished."""
    if not a or not b or a.status != "ok" or b.status != "ok":
        return None
    n = min(len(a.tokens), len(b.tokens))
    return sum(a.tokens[i] == b.tokens[i] for i in range(n)), n


def first_differences(a: Point, b: Point) -> list[dict[str, Any]]:
    """Where the greedy tokens of ``a`` and ``b`` first part, per question that differs:
    question (1-based), token index, and each run's top-2 gap there (None if not recorded)."""
    out = []
    for q, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)):
        i = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), None)
        if i is None:
            continue
        gap = [g[q][i] if q < len(g) and i < len(g[q]) else None for g in (a.gaps, b.gaps)]
        out.append({"question": q + 1, "token": i, "gap": gap[0], "gap_other": gap[1]})
    return out


def difference_lines(by: dict[tuple[str, int], Point], same: dict) -> list[str]:
    """One line per question where mesa fixed+cache and mesa fixed part, from the table's
    ``by`` ((config, doc length) -> point) and ``same`` (``equality``)."""
    lines = []
    for d, eq in same.items():
        if eq is None or eq[0] == eq[1]:
            continue
        for e in first_differences(by[(FIXED_CACHE, d)], by[(FIXED, d)]):
            lines.append(
                f"- doc {d}, question {e['question']}: first differs at generated token "
                f"{e['token'] + 1}; top-2 log p gap there {_f(e['gap'], '{:.3f}')} "
                f"({FIXED_CACHE}) / {_f(e['gap_other'], '{:.3f}')} ({FIXED})"
            )
    return lines


def equality(points: list[Point]) -> dict[int, tuple[int, int] | None]:
    """doc length -> equal_questions(mesa fixed+cache, mesa fixed)."""
    by = {(p.config, p.doc_len): p for p in points}
    lens = sorted({p.doc_len for p in points if p.config == FIXED_CACHE})
    return {d: equal_questions(by.get((FIXED_CACHE, d)), by.get((FIXED, d))) for d in lens}


def _ratio(a, b):
    return None if a is None or not b else a / b


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def markdown_table(points: list[Point], header: str = "") -> str:
    """One row per config x doc length (by length, then config order)."""
    by = {(p.config, p.doc_len): p for p in points}
    cols = ["config", "doc tokens", "Q", "cold TTFT ms", "warm TTFT p50 ms", "total s",
            f"warm / {FIXED}", f"warm / {REF}", "cache hits / queries (tokens)",
            f"greedy = {FIXED}", "status"]  # fmt: skip
    lines = [header] if header else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = {c: k for k, c in enumerate(CONFIGS)}
    same = equality(points)
    for p in sorted(points, key=lambda p: (p.doc_len, order.get(p.config, 9))):
        cold, warm = cold_warm(p)
        ref = {c: cold_warm(by[(c, p.doc_len)])[1] if (c, p.doc_len) in by else None
               for c in (FIXED, REF)}  # fmt: skip
        c = p.cache
        hits = f"{c['hits']:.0f} / {c['queries']:.0f}" if c else "-"
        eq = same.get(p.doc_len) if p.config == FIXED_CACHE else None
        status = p.status if not p.reason else f"{p.status}: {p.reason}"
        vals = [p.config, str(p.doc_len), str(len(p.ttft_ms)), _f(cold, "{:.1f}"),
                _f(warm, "{:.1f}"), _f(p.seconds, "{:.2f}"),
                _f(_ratio(warm, ref[FIXED]), "{:.3f}x"), _f(_ratio(warm, ref[REF]), "{:.3f}x"),
                hits, "-" if eq is None else f"{eq[0]}/{eq[1]}", status]  # fmt: skip
        lines.append("| " + " | ".join(vals) + " |")
    diffs = difference_lines(by, same)
    if diffs:
        lines += ["", f"Where {FIXED_CACHE} and {FIXED} part (a gap near 0 is a near-tie):"]
        lines += diffs
    return "\n".join(lines) + "\n"


def estimate_seconds(p: Point, done: list[Point]) -> float:
    """Another config's time at this length, else this config's last length scaled by length."""
    same = [q.seconds for q in done if q.doc_len == p.doc_len and q.seconds]
    if same:
        return max(same)
    mine = [q for q in done if q.config == p.config and q.seconds]
    return mine[-1].seconds * p.doc_len / mine[-1].doc_len if mine else 0.0


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    lo = min(1000, vocab // 4)  # clear of the special tokens at the start of the vocabulary
    return [rng.randrange(lo, vocab) for _ in range(n)]


def workload(doc_len: int, questions: int, seed: int, vocab: int, encode=None, text_ids=()):
    """(document ids, [question suffix ids]): a header naming the length, then ``text_ids``
    (--text's tokens, repeated to length) with ``encode`` (str -> ids) for the header and the
    questions, else seeded random ids.  The documents of two lengths differ from the start."""
    rng = random.Random(f"{seed}-{doc_len}")
    if encode is None:
        doc = random_ids(rng, doc_len, vocab)
        return doc, [random_ids(rng, QUESTION_LEN, vocab) for _ in range(questions)]
    head = encode(f"[{doc_len} tokens] Read this document and answer the questions after it.\n\n")
    body = (text_ids * (doc_len // max(len(text_ids), 1) + 1))[: max(doc_len - len(head), 0)]
    qs = [encode(f"\n\nQuestion {k + 1}: what does the document say about "
                 f"{TOPICS[k % len(TOPICS)]}? Answer in one sentence.")[:QUESTION_LEN]
          for k in range(questions)]  # fmt: skip
    return (head + body)[:doc_len], qs


# ---------------------------------------------------------------- servers and requests


def load_serve_load():
    """benchmarks/serve_load.py as a module (its dataclasses need it in sys.modules)."""
    if "serve_load" in sys.modules:
        return sys.modules["serve_load"]
    spec = importlib.util.spec_from_file_location("serve_load", HERE / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = mod
    spec.loader.exec_module(mod)
    return mod


def config_launch(name: str, model: str, max_model_len: int, mesa_config: dict,
                  server_args: str, cpu: bool) -> tuple[list[str], dict]:  # fmt: skip
    """(args, env) of one configuration's server, through serve_load.server_launch."""
    backend, split, caching = CONFIGS[name]
    mesa_cfg = {**mesa_config, "split": split} if split else {}
    if split == "dynamic":  # middle_chunk is refused without split: fixed; the rest applies
        mesa_cfg.pop("middle_chunk", None)
    extra = shlex.split(server_args)
    extra.append("--enable-prefix-caching" if caching else "--no-enable-prefix-caching")
    return load_serve_load().server_launch(backend, model, max_model_len, mesa_cfg, extra, cpu)


def chunk_tokens(choice: dict) -> tuple[list[int], list[float | None]]:
    """One streamed choice -> (token ids, top-2 log p gap per token; None without a
    runner-up).  Tokens come as ``token_id:N`` (``return_tokens_as_token_ids``)."""
    lp = choice.get("logprobs") or {}
    ids = [int(t.split(":", 1)[1]) for t in lp.get("tokens") or []]
    tops = lp.get("top_logprobs") or [None] * len(ids)
    gaps = []
    for top in tops:
        vals = sorted((top or {}).values(), reverse=True)
        gaps.append(vals[0] - vals[1] if len(vals) > 1 else None)
    return ids, gaps


def ask(base: str, model: str, prompt: list[int], max_tokens: int, timeout: float):
    """One streamed greedy completion: (TTFT ms, generated token ids, top-2 gaps)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "logprobs": 2,
            "return_tokens_as_token_ids": True}  # fmt: skip
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    t0, ttft, ids, gaps = time.perf_counter(), None, [], []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:]).get("choices", []):
                toks, tok_gaps = chunk_tokens(ch)
                if toks and ttft is None:
                    ttft = (time.perf_counter() - t0) * 1000
                ids += toks
                gaps += tok_gaps
    if ttft is None:
        raise RuntimeError("the stream ended without a token")
    return ttft, ids, gaps


def ask_questions(ask_one, doc: list[int], questions: list[list[int]], concurrent: bool):
    """[ask_one's result, e.g. (TTFT ms, token ids, gaps)] per question, in question order:
    ``ask_one(prompt)`` for each document + question, one at a time, or with ``concurrent``
    question 1 alone and then the others all at once."""
    if not concurrent or len(questions) < 2:
        return [ask_one(doc + q) for q in questions]
    from concurrent.futures import ThreadPoolExecutor

    first = ask_one(doc + questions[0])
    with ThreadPoolExecutor(max_workers=len(questions) - 1) as pool:
        return [first, *pool.map(lambda q: ask_one(doc + q), questions[1:])]


def read_metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        return parse_metrics(resp.read().decode())


def run_config(name, points, args, sl, cpu, docs, deadline, t_start, done) -> None:
    share_end = time.monotonic() + (deadline - time.monotonic()) / args._configs_left
    srv_args, env = config_launch(name, args.model, args.max_model_len, args.mesa_config,
                                  args.server_args, cpu)  # fmt: skip
    left = deadline - time.monotonic()
    if left < 30:
        for p in points:
            p.status, p.reason = "budget", "no time left to start the server"
        return
    log_path = args.out / "servers" / (name.replace(" ", "_").replace("+", "-") + ".log")
    srv = sl.mesa_serve_server(args.model, srv_args, env, log_path, timeout=min(600, left))
    el = lambda: f"[{time.monotonic() - t_start:6.0f} s]"  # noqa: E731
    log(f"{el()} {name}: starting server: {shlex.join(srv_args)}")
    try:
        srv.start()
    except Exception as exc:
        for p in points:
            p.status, p.reason = "server failed", str(exc).split(" (log:")[0][:160]
        log(f"{el()} {name}: server failed: {exc}")
        return
    base = srv.base_url[: -len("/v1")]
    try:
        ask(base, args.model, random_ids(random.Random(-1), 8, args._vocab), 2, 300)  # warm-up
        log(f"{el()} {name}: server up at {base}")
        for p in points:
            now, est = time.monotonic(), estimate_seconds(p, done)
            if now + est > share_end or now + 5 > deadline:
                p.status = "budget"
                p.reason = f"estimated {est:.0f} s, {max(share_end - now, 0):.0f} s left"
                log(f"{el()} {name} doc {p.doc_len}: not started ({p.reason})")
                continue
            doc, qs = docs[p.doc_len]
            before, t0 = read_metrics(base), time.monotonic()
            try:
                one = lambda prompt: ask(base, args.model, prompt, args.max_tokens,  # noqa: E731
                                         max(deadline - time.monotonic(), 5))  # fmt: skip
                for ttft, ids, gaps in ask_questions(one, doc, qs, args.concurrent):
                    p.ttft_ms.append(ttft)
                    p.tokens.append(ids)
                    p.gaps.append(gaps)
                p.status = "ok"
            except Exception as exc:  # a refused request, or the deadline passed mid-request
                p.status, p.reason = "failed", f"{type(exc).__name__}: {exc}"[:160]
            p.seconds = round(time.monotonic() - t0, 3)
            time.sleep(0.5)  # the counters are updated as the engine's stats arrive
            p.cache = counter_delta(before, read_metrics(base))
            done.append(p)
            cold, warm = cold_warm(p)
            log(f"{el()} {name} doc {p.doc_len}: {p.status} in {p.seconds} s, cold "
                f"{_f(cold, '{:.1f}')} ms, warm p50 {_f(warm, '{:.1f}')} ms, "
                f"cache {p.cache} {p.reason}")  # fmt: skip
    finally:
        srv.stop()
        log(f"{el()} {name}: server stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory, or llama2-7b-shape")
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--doc-lens", default="32768,131072", help="comma list of document tokens")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--text", help="real text for the document (else random token ids)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--server-args", default="", help="extra args for every server (one string)")
    ap.add_argument("--mesa-config", type=json.loads, default={}, help="JSON Mesa settings")
    ap.add_argument("--budget-seconds", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrent", action="store_true",
                    help="questions 2..Q at once, after question 1")  # fmt: skip
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("OUT", "out")) / "prefix_cache_ttft")  # fmt: skip
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    deadline = t_start + args.budget_seconds
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    doc_lens = [int(x) for x in args.doc_lens.split(",") if x.strip()]
    (args.out / "servers").mkdir(parents=True, exist_ok=True)
    sl = load_serve_load()
    if args.model == sl.DUMMY_7B:
        if args.text:
            ap.error(f"--text with {sl.DUMMY_7B}: dummy weights read no text")
        path, flags = sl.dummy_7b(args.out / "model")
        args.model, args.server_args = (
            str(path),
            shlex.join([*flags, *shlex.split(args.server_args)]),
        )
    from mesa_vllm.eval.methods import is_cpu_install, read_model_config

    cpu = is_cpu_install()
    args._vocab = int(read_model_config(args.model).get("vocab_size") or 32000)
    encode, text_ids = None, []
    if args.text:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        # ~4 characters a token: 8 per token is plenty, and a large corpus stays quick
        text_ids = encode(Path(args.text).read_text(errors="replace")[: 8 * max(doc_lens)])
    docs = {d: workload(d, args.questions, args.seed, args._vocab, encode, text_ids)
            for d in doc_lens}  # fmt: skip
    points = [Point(c, d) for c in configs for d in doc_lens]
    for p in points:
        need = p.doc_len + max(len(q) for q in docs[p.doc_len][1]) + args.max_tokens
        if need > args.max_model_len:
            p.status, p.reason = "skipped", f"prompt+output {need} > max-model-len"
    source = f"text `{args.text}`" if args.text else f"random token ids (seed {args.seed})"
    sending = "(2..Q at once, after 1)" if args.concurrent else "sent one at a time"
    header = (
        f"One document, {args.questions} questions {sending} (~{QUESTION_LEN}-token "
        f"suffixes), document from {source}, greedy, {args.max_tokens} tokens, TTFT "
        f"client-side (stream); warm = median of questions 2..{args.questions}; model "
        f"`{args.model}`, max-model-len {args.max_model_len}; {REF} = "
        f"{'the CPU build default backend' if cpu else 'FLASH_ATTN'}; server args "
        f"`{args.server_args or 'none'}`; mesa config `{json.dumps(args.mesa_config)}`.\n"
    )
    done: list[Point] = []
    try:
        for k, c in enumerate(configs):
            args._configs_left = len(configs) - k
            todo = [p for p in points if p.config == c and p.status == "pending"]
            if todo:
                run_config(c, todo, args, sl, cpu, docs, deadline, t_start, done)
    finally:
        for p in points:
            if p.status == "pending":
                p.status, p.reason = "budget", "not reached (the run stopped)"
        (args.out / "points.json").write_text(json.dumps([asdict(p) for p in points], indent=1))
        table = markdown_table(points, header)
        (args.out / "table.md").write_text(table)
        log(f"[{time.monotonic() - t_start:6.0f} s] done; wrote {args.out / 'table.md'}")
        print(table, flush=True)
    if cpu and any(e and e[0] != e[1] for e in equality(points).values()):
        log(f"ERROR: {FIXED_CACHE} greedy tokens differ from {FIXED} on CPU")
        return 2
    return 0 if any(p.status == "ok" for p in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
