"""Synthetic long-context samples in the style of the official Mesa passkey data.

A sample is: the task sentence, filler sentences, the key sentence at a chosen depth, more
filler, and the question.  Lengths are in tokens of the given tokenizer (anything with
``encode(text) -> list[int]``, e.g. a transformers tokenizer).  Pure Python, seeded.

Scoring (official code): the first integer in the answer equals the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NEEDLE_SENTENCE = (
    "The special magic number is {key}. Remember it. {key} is the special magic number."
)
NEEDLE_QUESTION = "What is the special magic number? The special magic number is"
HAYSTACK = [
    "The quick brown fox jumps over the lazy dog.",
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "A needle hides in a haystack of words.",
]


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    prompt: str
    answer: str
    n_tokens: int
    depth: float


def _count(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text))


def _fill(
    tok: Tokenizer,
    head: str,
    needle: str,
    tail: str,
    fillers: list[str],
    target_tokens: int,
    depth: float,
    rng: random.Random,
) -> tuple[str, int]:
    """Insert filler sentences around ``needle`` until the prompt is about target_tokens."""
    fixed = _count(tok, " ".join([head, needle, tail]))
    per = {f: max(1, _count(tok, " " + f) - (1 if _count(tok, "") else 0)) for f in set(fillers)}
    budget = max(0, target_tokens - fixed)
    chosen: list[str] = []
    used = 0
    while True:
        f = fillers[rng.randrange(len(fillers))] if len(fillers) > 1 else fillers[0]
        if used + per[f] > budget:
            break
        chosen.append(f)
        used += per[f]
    cut = round(depth * len(chosen))
    parts = [head, *chosen[:cut], needle, *chosen[cut:], tail]
    text = " ".join(parts)
    return text, _count(tok, text)


def passkey_sample(
    tok: Tokenizer,
    target_tokens: int,
    depth: float | None = None,
    rng: random.Random | None = None,
    key_digits: int = 5,
) -> Sample:
    """One passkey prompt of about ``target_tokens`` tokens, key at ``depth`` in [0, 1]."""
    rng = rng or random.Random(0)
    depth = rng.random() if depth is None else depth
    key = str(rng.randrange(10 ** (key_digits - 1), 10**key_digits))
    text, n = _fill(
        tok, TASK, KEY_SENTENCE.format(key=key), QUESTION, [FILLER], target_tokens, depth, rng
    )
    return Sample(text, key, n, depth)


def needle_sample(
    tok: Tokenizer,
    target_tokens: int,
    depth: float,
    rng: random.Random | None = None,
    key_digits: int = 7,
) -> Sample:
    """A needle-in-a-haystack prompt: varied haystack sentences, needle at ``depth``."""
    rng = rng or random.Random(0)
    key = str(rng.randrange(10 ** (key_digits - 1), 10**key_digits))
    text, n = _fill(
        tok,
        TASK,
        NEEDLE_SENTENCE.format(key=key),
        NEEDLE_QUESTION,
        HAYSTACK,
        target_tokens,
        depth,
        rng,
    )
    return Sample(text, key, n, depth)


def filler_text(tok: Tokenizer, target_tokens: int, rng: random.Random | None = None) -> str:
    """Passkey-style text without a question, for perplexity (about target_tokens tokens)."""
    rng = rng or random.Random(0)
    key = str(rng.randrange(10000, 100000))
    text, _ = _fill(
        tok, TASK, KEY_SENTENCE.format(key=key), "", [FILLER], target_tokens, rng.random(), rng
    )
    return text.rstrip()


_INT = re.compile(r"\d+")


def score(answer_text: str, key: str) -> bool:
    """Official rule: the first integer in the generated answer equals the key."""
    m = _INT.search(answer_text)
    return m is not None and m.group(0) == key
