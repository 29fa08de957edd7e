"""DynamicSplit, chunk plans, anchors and Stair PE positions (docs/CONTRACT.md).

Pure Python: no vLLM, no torch.  Everything here is a function of the token index p, the
prompt length T and the parameters, never of how the scheduler split the work, so chunked
prefill, preemption/recompute and batching cannot change what a token attends to.

Vocabulary
----------
A *segment* is a run of consecutive query tokens of one request that share one key set and
one position rule.  The backend plans every step as a list of segments per request and
executes each one as a small dense attention problem.

* ``causal``: short sequences (T <= L and p < L) and the first chunk: keys [0, p], positions
  = indices.
* ``middle``: middle chunk starting at s: keys [0, F) and [s, p]; key position i (i < F) or
  F + (i - s); query position F + (p - s).
* ``stair``: last chunk and decode: keys [0, p]; every token j takes pos(j) = j if j >= A
  else A - 1 - (A - 1 - j) // E, with anchor A = n - ((n - 1) mod C), or n - W when that is
  lower (``near_window`` W, default 0: the paper's rule); n = T for prompt tokens and
  n = p + 1 for generated ones.  Queries are scaled by max(1, ln(p + 1) / ln(L)).
  E is the fixed ``stair_width``, or with ``stair_width: auto`` (``MesaParams.stair_width``
  None) the smallest E that keeps every relative position of the query set of n inside the
  trained range (``stair_width_for``).
* ``weave``: the other members of the weave-PE family (docs/VARIANTS.md: rerope,
  leaky_rerope, self_extend, streaming, lm_infinite): keys [0, p] (sinks + window for the
  windowed variants); the position of each (query, key) pair depends on their distance, so
  the backend computes a near (plain RoPE) and a far score per pair.  Long queries follow
  it: the last chunk and long generated tokens with ``chunked_prefill``, else every long
  query.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mesa_vllm.support import PE_RULES, WINDOWED_PE

SegmentKind = Literal["causal", "middle", "stair", "weave"]
SPLITS = ("dynamic", "fixed")
__all__ = [
    "SPLITS",
    "WINDOWED_PE",
    "MesaParams",
    "Segment",
    "chunk_split",
    "dynamic_split",
    "fixed_split",
    "plan_request",
    "stable_prefix",
]


@dataclass(frozen=True)
class MesaParams:
    """Resolved parameters: L, F, Lc, Mmax, E, the log-n switch and the position rule; the
    one frozen object the engine config resolves to (``MesaConfig.resolved`` ->
    ``MesaConfig.params``) and every worker, plan and kernel reads.  Its field defaults
    are the paper's, and MesaConfig's.

    ``stair_width`` is E, or None for ``stair_width: auto``: E then depends on the stair query
    set (its sequence length n and chunk width C), see ``stair_width_for``; every consumer
    asks that function (or reads ``Segment.stair_width``) instead of this field.
    ``middle_chunk`` is the middle-chunk width C of ``split: fixed`` (None: L - F).
    ``near_window`` is W, the fewest tokens before n that keep their own positions under
    Stair PE (the anchor is at most n - W; 0: the paper's anchor, ``stair_anchor``).
    ``long_query_scale`` s multiplies every stair query (the last chunk of a long prompt and
    generated tokens past L) on top of log-n: an attention temperature 1 / s for long queries
    (1: the paper's rule).
    """

    train_len: int
    first_chunk: int = 100
    last_chunk: int = 512
    max_remainder: int = 200
    stair_width: int | None = 50
    log_n_scaling: bool = True
    pe: str = "stair"
    chunked_prefill: bool = True
    window: int = 0
    leaky_factor: float = 1.0
    group_size: int = 1
    sink_tokens: int = 0
    split: str = "dynamic"
    middle_chunk: int | None = None
    near_window: int = 0
    long_query_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} must be one of {', '.join(SPLITS)}")
        check_middle_chunk(self.train_len, self.first_chunk, self.split, self.middle_chunk)
        check_rules(self.train_len, self.first_chunk, self.pe, self.chunked_prefill)
        check_near_window(self.train_len, self.first_chunk, self.pe, self.near_window)
        check_long_query_scale(self.pe, self.long_query_scale)
        bad_width = self.stair_width is not None and self.stair_width < 1
        if self.first_chunk < 1 or self.last_chunk < 1 or bad_width or self.max_remainder < 0:
            raise ValueError(
                "first_chunk >= 1, last_chunk >= 1, stair_width >= 1 or None (auto), "
                "max_remainder >= 0"
            )
        if self.pe != "stair" and (self.window < 1 or self.leaky_factor < 1 or self.group_size < 1):
            raise ValueError("weave variants need window >= 1, leaky_factor >= 1, group_size >= 1")

    @property
    def windowed(self) -> bool:
        """Sink + window masks (streaming, lm_infinite)."""
        return PE_RULES[self.pe].windowed

    @property
    def long_rule(self) -> SegmentKind:
        """The rule of last-chunk tokens and long generated tokens."""
        return "weave" if PE_RULES[self.pe].weave else "stair"

    @property
    def default_width(self) -> int:
        """C for requests that grow past L while decoding (L - F)."""
        return self.train_len - self.first_chunk

    @property
    def fixed_width(self) -> int:
        """C of ``split: fixed``: ``middle_chunk``, or L - F when it is not set."""
        return self.middle_chunk or self.default_width


def check_middle_chunk(
    train_len: int | None, first_chunk: int, split: str, middle_chunk: int | None
) -> None:
    """``middle_chunk`` (the fixed split's middle-chunk width) needs ``split: fixed`` and
    1 <= middle_chunk <= L - F (a middle chunk's positions F .. F + C - 1 stay inside L);
    ValueError naming the field.  train_len may be None (MesaConfig before the model's
    default is known): the upper bound is then checked once it is."""
    if middle_chunk is None:
        return
    if split != "fixed":
        raise ValueError(f"middle_chunk={middle_chunk} needs split: fixed (got split={split!r})")
    hi = None if train_len is None else train_len - first_chunk
    if middle_chunk < 1 or (hi is not None and middle_chunk > hi):
        bound = f"train_len - first_chunk = {hi}" if hi is not None else "train_len - first_chunk"
        raise ValueError(f"middle_chunk={middle_chunk} must be in 1 .. {bound}")


def check_long_query_scale(pe: str, long_query_scale: float) -> None:
    """``long_query_scale`` s: 1 (off), or 0 < s <= 16 with ``pe: stair``; ValueError naming
    the field."""
    if long_query_scale == 1.0:
        return
    if pe != "stair":
        raise ValueError(f"long_query_scale={long_query_scale} needs pe: stair (got pe={pe!r})")
    if not 0.0 < long_query_scale <= 16.0:
        raise ValueError(f"long_query_scale={long_query_scale} must be in (0, 16]")


def check_near_window(train_len: int | None, first_chunk: int, pe: str, near_window: int) -> None:
    """``near_window`` W: 0 (the paper's anchor), or 1 <= W <= L - F - 1 with ``pe: stair``
    (n - A then stays <= L - F - 1, as with the paper's anchor, so a stair query's nearest
    tokens alone never reach L); ValueError naming the field.  train_len may be None
    (MesaConfig before the model's default is known): the bound is then checked once it is."""
    if near_window == 0:
        return
    if pe != "stair":
        raise ValueError(f"near_window={near_window} needs pe: stair (got pe={pe!r})")
    hi = None if train_len is None else train_len - first_chunk - 1
    if near_window < 0 or (hi is not None and near_window > hi):
        bound = f"train_len - first_chunk - 1 = {hi}" if hi is not None else "L - F - 1"
        raise ValueError(f"near_window={near_window} must be 0 or in 1 .. {bound}")


def check_rules(
    train_len: int | None, first_chunk: int, pe: str, chunked_prefill: bool | None
) -> None:
    """The rules tying L, F, the position rule and chunked prefill together, for MesaConfig
    (user input: train_len and chunked_prefill may still be None, the model's / the rule's
    default) and MesaParams alike; ValueError naming the first one broken.

    With chunked prefill F <= L - 2, which keeps every DynamicSplit chunk width >= 1
    (without it no chunk is planned and F is not read); stair needs chunked prefill, the
    windowed rules refuse it.
    """
    rule = PE_RULES[pe]
    chunked = chunked_prefill if chunked_prefill is not None else bool(rule.chunked)
    if chunked and train_len is not None and first_chunk > train_len - 2:
        raise ValueError(
            f"first_chunk={first_chunk} must be < train_len - 1 = {train_len - 1} "
            f"(allowed range: 1 .. {train_len - 2})"
        )
    if rule.chunked is True and chunked_prefill is False:
        raise ValueError(f"chunked_prefill=false is not allowed with pe={pe!r}")
    if rule.chunked is False and chunked_prefill:
        raise ValueError(f"chunked_prefill=true is not allowed with pe={pe!r}")


@dataclass(frozen=True)
class ChunkPlan:
    """DynamicSplit of one prompt of length T (Algorithm 2 of the paper).

    ``is_long`` is False when T <= L: the whole prompt is ordinary causal attention.
    Middle chunk k covers [F + k*C, F + (k+1)*C); the last chunk is [last_start, T).
    """

    prompt_len: int
    train_len: int
    first: int
    width: int
    n_mid: int

    @property
    def is_long(self) -> bool:
        return self.prompt_len > self.train_len

    @property
    def last_start(self) -> int:
        return self.first + self.n_mid * self.width

    def middle_start(self, k: int) -> int:
        return self.first + k * self.width


def dynamic_split(prompt_len: int, params: MesaParams) -> ChunkPlan:
    """Chunk plan of a prompt of ``prompt_len`` tokens.

    X = T - Lc - F, Nq = X // (L - F), M = X mod (L - F).  M < Mmax: C = L - F, Nq middle
    chunks; else C = X // (Nq + 1), Nq + 1 middle chunks.  When X <= 0 (T barely over L and
    Lc large) there is no middle chunk and C = L - F: everything after F is the last chunk.
    """
    T, L, F = prompt_len, params.train_len, params.first_chunk
    if T <= L or not params.chunked_prefill:  # without chunked prefill no chunk is read
        return ChunkPlan(T, L, F, params.default_width, 0)
    X = T - params.last_chunk - F
    if X <= 0:
        return ChunkPlan(T, L, F, params.default_width, 0)
    nq, rem = divmod(X, L - F)
    if rem < params.max_remainder:
        if nq == 0:
            return ChunkPlan(T, L, F, params.default_width, 0)
        return ChunkPlan(T, L, F, L - F, nq)
    return ChunkPlan(T, L, F, X // (nq + 1), nq + 1)


def fixed_split(prompt_len: int, params: MesaParams) -> ChunkPlan:
    """The length-independent chunk plan (``split: fixed``, docs/CONTRACT.md section 2b).

    T <= L (or no chunked prefill): one causal chunk.  Else C = ``params.fixed_width``
    (``middle_chunk``, default L - F), and n_mid = max(0, (T - F - Lc) // C): the last chunk
    [F + n_mid*C, T) holds Lc + ((T - F - Lc) mod C) tokens, in [Lc, Lc + C), or all T - F
    tokens after the first chunk when T - F < Lc.  Every boundary F + k*C is the same for
    every prompt length, so a token before the last chunk computes the same KV in every
    prompt sharing its prefix.  A narrower C recomputes fewer tokens per request (at most
    Lc + C - 1) at the price of less context for each middle-chunk token (F + C).
    """
    T, L, F = prompt_len, params.train_len, params.first_chunk
    if T <= L or not params.chunked_prefill:
        return ChunkPlan(T, L, F, params.default_width, 0)
    c = params.fixed_width
    return ChunkPlan(T, L, F, c, max(0, (T - F - params.last_chunk) // c))


def chunk_split(prompt_len: int, params: MesaParams) -> ChunkPlan:
    """The chunk plan of ``params.split``: ``dynamic_split`` or ``fixed_split``."""
    if params.split == "fixed":
        return fixed_split(prompt_len, params)
    return dynamic_split(prompt_len, params)


def stable_prefix(prompt_len: int, params: MesaParams) -> int:
    """Number of leading tokens of a request whose KV is reusable by another request that
    shares them (``split: fixed``; docs/CONTRACT.md section 7): T > L: the start of the last
    chunk (every earlier token is a first- or middle-chunk token); T <= L: F + C, which is L
    for the default C = L - F (the prompt and every generated token at p < L are plain causal
    tokens, and the first F + C of them are computed as the first chunk and middle chunk 0 of
    a longer prompt compute them; tokens from F + C on see keys a longer prompt's middle chunk
    1.. does not give them; tokens from L on are stair tokens).  Callers cap it by the tokens
    actually computed.  With ``split: dynamic`` the boundaries move with T: 0 (nothing is
    shared)."""
    if params.split != "fixed":
        return 0
    if prompt_len <= params.train_len:
        return params.first_chunk + params.fixed_width
    plan = fixed_split(prompt_len, params)
    return plan.last_start if plan.is_long and params.chunked_prefill else 0


def stair_anchor(n: int, width: int, near_window: int = 0) -> int:
    """A = n - ((n - 1) mod C), the paper's anchor, lowered to n - W when it would leave fewer
    than W = ``near_window`` tokens before n: the first index that keeps its own position.

    With the paper's rule the near window n - A cycles through 0 .. C - 1 as n grows; at
    n - 1 = kC it is empty and every key, the query's neighbours included, sits on the stair.
    """
    return min(n - ((n - 1) % width), n - near_window)


def stair_position(j: int, anchor: int, stair_width: int) -> int:
    """pos(j) = j if j >= A else A - 1 - (A - 1 - j) // E (the official code's floor rule)."""
    if j >= anchor:
        return j
    return anchor - 1 - (anchor - 1 - j) // stair_width


def stair_width_for(n: int, width: int, params: MesaParams) -> int:
    """E of the stair queries with sequence length n and chunk width C (``width``).

    A fixed ``stair_width`` is returned as is.  ``stair_width: auto`` (None): with anchor
    A = ``stair_anchor(n, C, W)``, the largest relative position a query of that n sees is
    (n - A) + floor((A - 1) / E) (query n - 1 against key 0), and E(n) is the smallest integer
    E >= 1 with (n - A) + floor((A - 1) / E) <= L - 1, i.e. floor((A - 1) / (R + 1)) + 1 with
    R = L - 1 - (n - A).  R >= 1 for every stair query (n - A <= max(C - 1, W) <= L - F - 1);
    n is T for every prompt token of the last chunk and p + 1 for a generated token at index p.
    """
    if params.stair_width is not None:
        return params.stair_width
    a = stair_anchor(n, width, params.near_window)
    room = params.train_len - 1 - (n - a)  # R
    if room < 1:
        raise ValueError(f"n={n}, C={width}: n - A = {n - a} leaves no room below L")
    return (a - 1) // (room + 1) + 1


def log_n_scale(p: int, train_len: int) -> float:
    """max(1, ln(p + 1) / ln(L)) for a stair query at index p."""
    return max(1.0, math.log(p + 1) / math.log(train_len))


@dataclass(frozen=True)
class Segment:
    """Consecutive queries [q_start, q_end) of one request sharing keys and position rule.

    ``key_ranges`` lists the half-open index ranges of keys the segment reads (each query p
    additionally masks keys j > p).  ``chunk_start`` is s for ``middle``; ``anchor`` is A and
    ``stair_width`` is E for ``stair`` (``stair_width_for``: with ``stair_width: auto`` one E
    per segment, generated-token segments end where E changes).
    """

    kind: SegmentKind
    q_start: int
    q_end: int
    first: int = 0
    chunk_start: int = 0
    anchor: int = 0
    stair_width: int = 1
    sink: int = 0
    window: int = 0

    @property
    def key_ranges(self) -> tuple[tuple[int, int], ...]:
        if self.kind == "middle":
            return ((0, self.first), (self.chunk_start, self.q_end))
        if self.kind == "weave" and self.window:  # sinks + the window of the first query
            sink = min(self.sink, self.q_end)
            lo = max(sink, self.q_start - self.window + 1)
            return ((0, lo),) if lo >= self.q_end else ((0, sink), (lo, self.q_end))
        return ((0, self.q_end),)


def token_segment_key(p: int, plan: ChunkPlan, params: MesaParams) -> tuple:
    """What decides token p's attention: (kind, chunk_start, anchor).  Equal keys => same
    segment; the backend merges consecutive tokens with equal keys."""
    T = plan.prompt_len
    weave = params.long_rule == "weave"
    if p < T:
        if not plan.is_long:
            return ("causal", 0, 0)
        if weave and not params.chunked_prefill:
            return ("weave", 0, 0)
        if p < plan.first:
            return ("causal", 0, 0)
        if p < plan.last_start:
            k = (p - plan.first) // plan.width
            return ("middle", plan.middle_start(k), 0)
        return ("weave", 0, 0) if weave else ("stair", 0, _anchor(T, plan, params))
    n = p + 1
    if n <= params.train_len:
        return ("causal", 0, 0)
    return ("weave", 0, 0) if weave else ("stair", 0, _anchor(n, plan, params))


def _anchor(n: int, plan: ChunkPlan, params: MesaParams) -> int:
    return stair_anchor(n, plan.width, params.near_window)


def plan_request(
    prompt_len: int, q_start: int, q_end: int, params: MesaParams, plan: ChunkPlan | None = None
) -> list[Segment]:
    """Segments for the queries [q_start, q_end) of a request with prompt length T.

    Runs in O(number of segments + decode tokens): middle chunks are jumped over whole.
    """
    if plan is None:
        plan = chunk_split(prompt_len, params)
    segs: list[Segment] = []
    p = q_start
    while p < q_end:
        kind, s, a = token_segment_key(p, plan, params)
        end = _segment_end(p, kind, s, a, plan, params, q_end)
        if segs and kind == "causal" and segs[-1].kind == "causal":
            segs[-1] = Segment("causal", segs[-1].q_start, end)
        else:
            window = params.window if kind == "weave" and params.windowed else 0
            if kind == "stair":
                e = stair_width_for(p + 1 if p >= prompt_len else prompt_len, plan.width, params)
            else:
                e = params.stair_width or 1
            segs.append(
                Segment(
                    kind,
                    p,
                    end,
                    params.first_chunk,
                    s,
                    a,
                    e,
                    params.sink_tokens if window else 0,
                    window,
                )
            )
        p = end
    return segs


def _segment_end(
    p: int, kind: str, s: int, a: int, plan: ChunkPlan, params: MesaParams, q_end: int
) -> int:
    T = plan.prompt_len
    if p < T:
        if kind == "causal":
            end = T if not plan.is_long else plan.first
        elif kind == "middle":
            end = s + plan.width
        else:
            end = T
        return min(end, q_end)
    if kind == "causal":
        return min(params.train_len, q_end)  # generated tokens with p + 1 <= L
    if kind == "weave":
        return q_end  # no anchor: every long generated token follows one rule
    if a < stair_anchor(p + 1, plan.width):
        return p + 1  # near_window lowered the anchor to n - W: it moves with every token
    # generated stair tokens share the anchor while p // C is constant: p in [A-1, A-1+C)
    # (near_window leaves it there: n - W only grows)
    end = a - 1 + plan.width
    if params.stair_width is None:
        # auto: E(n) = (A - 1) // (L - (n - A)) + 1 grows with n; it stays e while
        # L - (n - A) >= (A - 1) // e + 1, i.e. up to n = A + L - ((A - 1) // e + 1)
        e = stair_width_for(p + 1, plan.width, params)
        end = min(end, a + params.train_len - ((a - 1) // e + 1))
    return min(end, q_end)


def max_stair_distance(seq_len: int, params: MesaParams) -> int:
    """Largest relative position a stair query at index seq_len - 1 can see (for warnings)."""
    plan = chunk_split(seq_len, params)
    a = _anchor(seq_len, plan, params)
    e = stair_width_for(seq_len, plan.width, params)
    return (seq_len - 1) - stair_position(0, a, e)
