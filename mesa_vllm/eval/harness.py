"""Run passkey / needle / perplexity tasks against one OpenAI-compatible endpoint.

Prompts are built once (``make_jobs``, seeded per length/depth/index, so every method sees
the same prompts), sent concurrently with the ``openai`` client (completions API,
temperature 0), and reduced to one point per length (and depth, for needle):

- passkey / needle: ``{"length", "depth", "n", "correct", "accuracy", "errors", "skipped",
  "prompt_tokens"}``; accuracy = correct / (n - skipped), errors count as wrong.
- ppl: ``{"length", "n", "ppl", "ppl_all", "nll", "nll_all", "scored_tokens",
  "scored_tokens_all", "errors", "skipped", "prompt_tokens"}``; ``nll`` is the mean NLL per
  token (nats) over the last ``tail`` prompt tokens of each text and ``ppl`` = exp(nll);
  ``nll_all`` / ``ppl_all`` over all of them (the first token has no logprob); pooled over
  samples.

Perplexity text is synthetic passkey filler by default; with a corpus (``text_windows``) each
prompt is a window of exactly N corpus tokens (N = the length; the tokenizer's BOS first when
it adds one) at a seeded offset, sent as a list of token ids so no re-tokenization changes it.

Prompt logprobs come from ``echo=True, logprobs=0, max_tokens=0`` (vLLM 0.26 answers with
the prompt's logprobs, first entry None); NaN logprobs make vLLM answer 400 "Out of range
float values are not JSON compliant", recorded as a sample error.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from mesa_vllm.eval import data

TASKS = ("passkey", "needle", "ppl")
ANSWER_TOKENS = 8


class EndpointError(RuntimeError):
    """The endpoint cannot be reached or has no usable model (one-line message)."""


@dataclass(frozen=True)
class Job:
    """One request: its prompt and what to score it against."""

    length: int
    depth: float | None
    index: int
    prompt: str | tuple[int, ...]  # text, or token ids (sent as they are)
    key: str | None
    n_tokens: int
    offset: int | None = None  # a corpus window's first token in the tokenized corpus


@dataclass(frozen=True)
class Endpoint:
    """A reachable OpenAI-compatible server and the model to query on it."""

    base_url: str
    model: str
    max_model_len: int | None
    client: Any


def normalize_base_url(url: str) -> str:
    """``http://h:p`` -> ``http://h:p/v1``; a URL with a path is kept as given."""
    url = url.rstrip("/")
    if urlparse(url).path in ("", "/"):
        url += "/v1"
    return url


def connect(
    base_url: str, model: str | None = None, api_key: str = "EMPTY", timeout: float = 600.0
) -> Endpoint:
    """Open a client, list models, pick ``model`` (default: the first); EndpointError if not."""
    import openai

    base_url = normalize_base_url(base_url)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
    try:
        models = list(client.models.list())
    except openai.APIConnectionError as exc:
        raise EndpointError(f"cannot reach endpoint {base_url} ({exc.__cause__ or exc})") from None
    except openai.APIError as exc:
        raise EndpointError(f"endpoint {base_url} failed to list models: {exc}") from None
    ids = [m.id for m in models]
    if not ids:
        raise EndpointError(f"endpoint {base_url} serves no models")
    chosen = model or ids[0]
    if chosen not in ids:
        raise EndpointError(f"model {chosen!r} not served at {base_url} (served: {ids})")
    card = next(m for m in models if m.id == chosen)
    max_len = getattr(card, "max_model_len", None)
    return Endpoint(base_url, chosen, int(max_len) if max_len else None, client)


def _rng(seed: int, task: str, length: int, depth: float | None, index: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{depth}/{index}")


def text_windows(
    ids: Sequence[int],
    lengths: Sequence[int],
    samples: int,
    seed: int,
    prefix: Sequence[int] = (),
    shared_end: bool = False,
) -> list[Job]:
    """Perplexity jobs on real text: per length N, ``samples`` windows of exactly N tokens.

    A window is ``prefix`` (e.g. the BOS token) plus ``N - len(prefix)`` consecutive tokens of
    ``ids`` (the tokenized corpus) from an offset drawn without replacement per length
    (``random.Random(f"{seed}/ppl-text/{N}")``): deterministic in seed, distinct offsets
    within a length, independent of the other lengths.  ValueError when the corpus is
    shorter than the longest window or has fewer offsets than samples.

    ``shared_end``: sample i of every length ends at the same corpus token instead, one end
    per sample drawn without replacement (``random.Random(f"{seed}/ppl-text/end")``) from the
    ends the longest window allows, so every length scores the same last tokens and only
    the context before them grows (the windows then depend on the longest length asked).
    """
    prefix = tuple(int(t) for t in prefix)
    for length in lengths:  # every length's windows must fit before any is drawn
        body = length - len(prefix)
        if body < 1:
            raise ValueError(f"length {length} leaves no corpus token after the prefix {prefix}")
        if len(ids) < body:
            raise ValueError(
                f"the corpus has {len(ids)} tokens, fewer than the longest window "
                f"({max(lengths)} tokens); use a longer --text or shorter lengths"
            )
        span = len(ids) - body + 1
        if samples > span:
            raise ValueError(
                f"the corpus ({len(ids)} tokens) has only {span} distinct windows of {length} "
                f"tokens, fewer than {samples} samples"
            )
    if shared_end:  # the ends the longest window allows, one per sample
        longest = max(lengths) - len(prefix)
        ends = random.Random(f"{seed}/ppl-text/end").sample(range(longest, len(ids) + 1), samples)
    jobs = []
    for length in lengths:
        body = length - len(prefix)
        if shared_end:
            offsets = [end - body for end in ends]
        else:
            span = len(ids) - body + 1
            offsets = random.Random(f"{seed}/ppl-text/{length}").sample(range(span), samples)
        for i, off in enumerate(offsets):
            window = prefix + tuple(ids[off : off + body])
            jobs.append(Job(length, None, i, window, None, length, off))
    return jobs


def make_jobs(
    task: str,
    tok: data.Tokenizer,
    lengths: Sequence[int],
    samples: int,
    seed: int,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    text_ids: Sequence[int] | None = None,
    text_prefix: Sequence[int] = (),
    shared_end: bool = False,
) -> list[Job]:
    """All requests of a task: lengths x samples (x depths for needle), deterministic in seed.

    For ppl with ``text_ids`` (a tokenized corpus): ``text_windows`` (``shared_end``: every
    length scores the same last tokens); else synthetic filler.
    """
    if task == "ppl" and text_ids is not None:
        return text_windows(text_ids, lengths, samples, seed, text_prefix, shared_end)
    jobs = []
    for length in lengths:
        for depth in depths if task == "needle" else [None]:
            for i in range(samples):
                rng = _rng(seed, task, length, depth, i)
                if task == "passkey":
                    s = data.passkey_sample(tok, length, rng=rng)
                    jobs.append(Job(length, s.depth, i, s.prompt, s.answer, s.n_tokens))
                elif task == "needle":
                    s = data.needle_sample(tok, length, depth, rng=rng)
                    jobs.append(Job(length, depth, i, s.prompt, s.answer, s.n_tokens))
                elif task == "ppl":
                    text = data.filler_text(tok, length, rng=rng)
                    jobs.append(Job(length, None, i, text, None, len(tok.encode(text))))
                else:
                    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return jobs


def _error_text(exc: Exception) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    if "Out of range float values" in msg:  # vLLM's JSON encoder met NaN/inf logprobs
        msg += " (the model's logprobs are NaN/inf)"
    return f"{type(exc).__name__}: {msg}"[:300]


# A pooled keep-alive connection the server closed just as a request went out fails with a
# connection error before the server saw the request; the requests here are idempotent, so
# such a request is sent again (a timeout is not: the server may still be working on it).
CONNECTION_RETRIES = 2


def _dropped_connection(exc: BaseException) -> bool:
    import openai

    return isinstance(exc, openai.APIConnectionError) and not isinstance(
        exc, openai.APITimeoutError
    )


def _prompt(job: Job) -> str | list[int]:
    return job.prompt if isinstance(job.prompt, str) else list(job.prompt)


def _answer(ep: Endpoint, job: Job, max_tokens: int) -> dict[str, Any]:
    resp = ep.client.completions.create(
        model=ep.model, prompt=_prompt(job), max_tokens=max_tokens, temperature=0.0
    )
    text = resp.choices[0].text
    return {
        "answer": text,
        "correct": data.score(text, job.key or ""),
        "prompt_tokens": resp.usage.prompt_tokens if resp.usage else job.n_tokens,
    }


def _logprobs(ep: Endpoint, job: Job, tail: int | None) -> dict[str, Any]:
    resp = ep.client.completions.create(
        model=ep.model, prompt=_prompt(job), max_tokens=0, temperature=0.0, echo=True, logprobs=0
    )
    n = resp.usage.prompt_tokens if resp.usage else job.n_tokens
    lps = list(resp.choices[0].logprobs.token_logprobs)[:n]
    k = tail if tail else max(1, n // 4)
    vals = [x for x in lps[1:] if x is not None]
    tail_vals = [x for x in lps[max(1, n - k) :] if x is not None]
    return {
        "prompt_tokens": n,
        "nll_sum": -math.fsum(tail_vals),
        "scored": len(tail_vals),
        "nll_sum_all": -math.fsum(vals),
        "scored_all": len(vals),
    }


def run_jobs(
    ep: Endpoint,
    task: str,
    jobs: Sequence[Job],
    concurrency: int = 8,
    max_tokens: int = ANSWER_TOKENS,
    ppl_tail: int | None = None,
    on_done: Callable[[], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Send every job; one record per job (in job order) with its result, error or skip note.

    Once ``cancel`` is set, jobs not yet sent are recorded as skipped ("cancelled").
    """
    budget = ep.max_model_len
    need = 1 if task == "ppl" else max_tokens

    def one(job: Job) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "length": job.length,
            "depth": job.depth,
            "index": job.index,
            "key": job.key,
            "prompt_tokens": job.n_tokens,
            "error": None,
            "skipped": None,
        }
        if job.offset is not None:
            rec["offset"] = job.offset
        if cancel is not None and cancel.is_set():
            rec["skipped"] = "cancelled"
            return rec
        if budget is not None and job.n_tokens + need > budget:
            rec["skipped"] = f"prompt of {job.n_tokens} tokens + {need} > max_model_len {budget}"
            return rec
        for attempt in range(1 + CONNECTION_RETRIES):
            try:
                if task == "ppl":
                    rec.update(_logprobs(ep, job, ppl_tail))
                else:
                    rec.update(_answer(ep, job, max_tokens))
                rec["error"] = None
                break
            except Exception as exc:  # an HTTP error is data: the method failed this sample
                rec["error"] = _error_text(exc)
                if not _dropped_connection(exc) or attempt == CONNECTION_RETRIES:
                    break
                rec["retries"] = attempt + 1  # sent again
        return rec

    records: list[dict[str, Any] | None] = [None] * len(jobs)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futs = {pool.submit(one, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futs):
            records[futs[fut]] = fut.result()
            if on_done:
                on_done()
    finally:  # on Ctrl-C do not wait for queued requests; in-flight ones die with the server
        pool.shutdown(wait=False, cancel_futures=True)
    return [r for r in records if r is not None]


def aggregate(task: str, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reduce sample records to points, one per length (per (length, depth) for needle)."""
    groups: dict[tuple[int, float | None], list[dict[str, Any]]] = {}
    for r in records:
        key = (r["length"], r["depth"] if task == "needle" else None)
        groups.setdefault(key, []).append(r)
    points = []
    for (length, depth), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        done = [r for r in rs if not r["skipped"]]
        ok = [r for r in done if not r["error"]]
        pt: dict[str, Any] = {
            "length": length,
            "depth": depth,
            "n": len(rs),
            "errors": len(done) - len(ok),
            "skipped": len(rs) - len(done),
            "prompt_tokens": (sum(r["prompt_tokens"] for r in done) / len(done)) if done else None,
            "first_error": next((r["error"] for r in done if r["error"]), None),
        }
        if task == "ppl":
            scored = sum(r["scored"] for r in ok)
            scored_all = sum(r["scored_all"] for r in ok)
            nll, nll_all = _mean(ok, "nll_sum", scored), _mean(ok, "nll_sum_all", scored_all)
            pt["scored_tokens"] = scored
            pt["scored_tokens_all"] = scored_all
            pt["nll"], pt["nll_all"] = nll, nll_all
            pt["ppl"] = _ppl(sum(r["nll_sum"] for r in ok), scored)
            pt["ppl_all"] = _ppl(sum(r["nll_sum_all"] for r in ok), scored_all)
        else:
            pt["correct"] = sum(1 for r in ok if r["correct"])
            pt["accuracy"] = pt["correct"] / len(done) if done else None
        points.append(pt)
    return points


def _mean(records: Sequence[dict[str, Any]], key: str, n: int) -> float | None:
    total = math.fsum(r[key] for r in records)
    return total / n if n and math.isfinite(total) else None


def _ppl(nll_sum: float, n: int) -> float | None:
    if n == 0 or not math.isfinite(nll_sum):
        return None
    return math.exp(min(nll_sum / n, 700.0))
