"""What the Mesa backend changes in vLLM's engine configuration, decided once at startup.

Runs in the process that builds the ``VllmConfig`` (the API server / ``LLM``), before it is
sent to the engine core and the workers, so every process sees the same resolved settings:

* validate ``additional_config["mesa"]`` (MesaConfig) and fill ``train_len`` from the model;
* validate the ``MESA_VLLM_*`` environment variables (``mesa_vllm.envs``), so a bad value
  stops start-up here, named, before a worker reads it;
* refuse architectures and rope types Mesa does not support, naming them;
* prefix caching: with ``split: dynamic`` off (a cached block's KV depends on the prompt
  length that chose its chunk plan, so blocks cannot be shared between prompts; an explicit
  ``--enable-prefix-caching`` is refused, naming ``split: fixed``); with ``split: fixed``
  left as vLLM has it (on by default), bounded per request by ``plan.stable_prefix``
  (``patches.patch_scheduler_prefix_cache``);
* ask vLLM for per-request prompt lengths in the attention metadata (``rswa_window``);
* warn when the stair positions of some prompt or decode length up to ``max_model_len``
  reach beyond the trained length (``worst_stair_span``), naming the smallest stair width
  that keeps every one inside it (not with ``stair_width: auto``: there every span fits by
  construction, ``plan.stair_width_for``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from mesa_vllm import envs
from mesa_vllm.config import MesaConfig, MesaConfigError
from mesa_vllm.plan import MesaParams, chunk_split, stair_anchor, stair_position
from mesa_vllm.support import ARCHITECTURES, ROPE_TYPES

logger = logging.getLogger("vllm.mesa_vllm")

_UNSUPPORTED_HF_FIELDS = ("llama_4_scaling", "dual_chunk_attention_config")


def is_mesa_backend(backend: Any) -> bool:
    """True for the MESA alias / our CUSTOM registration, given an enum member or a string."""
    if backend is None:
        return False
    name = getattr(backend, "name", str(backend)).upper()
    if name == "MESA":
        return True
    if name != "CUSTOM":
        return False
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    path = _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM, "")
    return path.startswith("mesa_vllm.")


def mesa_enabled(vllm_config: Any) -> bool:
    return is_mesa_backend(getattr(vllm_config.attention_config, "backend", None))


def model_train_len(hf_text_config: Any) -> int:
    """The trained context: HF ``max_position_embeddings``."""
    value = getattr(hf_text_config, "max_position_embeddings", None)
    if not isinstance(value, int) or value < 2:
        raise MesaConfigError(
            "mesa.train_len: the model config has no max_position_embeddings; set "
            'train_len in --additional-config \'{"mesa": {"train_len": N}}\''
        )
    return value


def rope_type_of(hf_text_config: Any) -> str:
    params = getattr(hf_text_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" not in params and params:
        # per-layer-type rope parameters: all must agree
        kinds = {p.get("rope_type", "default") for p in params.values() if isinstance(p, dict)}
        return kinds.pop() if len(kinds) == 1 else ",".join(sorted(kinds))
    return params.get("rope_type", "default") if isinstance(params, dict) else "default"


def resolve(vllm_config: Any) -> MesaConfig:
    """Validate and complete the Mesa settings of a VllmConfig; raise MesaConfigError."""
    model_config = vllm_config.model_config
    arch = model_config.architecture
    if arch not in ARCHITECTURES:
        raise MesaConfigError(
            f"--attention-backend mesa does not support architecture {arch!r}; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    hf = model_config.hf_text_config
    rope = rope_type_of(hf)
    if rope not in ROPE_TYPES:
        raise MesaConfigError(
            f"--attention-backend mesa does not support rope type {rope!r} of this model; "
            f"supported rope types: {', '.join(ROPE_TYPES)}"
        )
    for field in _UNSUPPORTED_HF_FIELDS:
        if getattr(hf, field, None):
            raise MesaConfigError(f"--attention-backend mesa does not support {field}")
    if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
        raise MesaConfigError(
            f"--attention-backend mesa does not support sliding_window={hf.sliding_window}; "
            "override it with --hf-overrides '{\"sliding_window\": null}'"
        )
    mesa = MesaConfig.from_additional_config(vllm_config.additional_config)
    return mesa.resolved(model_train_len(hf), model_config.max_model_len)


def check_environment() -> None:
    """MesaConfigError for the first bad ``MESA_VLLM_*`` value (the workers read them again,
    where an error would surface only inside the engine core's start-up traceback)."""
    reads = (envs.mesa_kernel, envs.fresh_prefill_fa, envs.middle_prefill_mode,
             envs.decode_kernel_options)  # fmt: skip
    for read in reads:
        try:
            read()
        except ValueError as exc:
            raise MesaConfigError(str(exc)) from None


def check_kv_cache_dtype(cache_dtype: str) -> None:
    """An fp8 KV cache needs the Triton kernels (the torch path reads the model dtype):
    MesaConfigError naming the option where this device would run the torch path."""
    if not str(cache_dtype).startswith("fp8"):
        return
    from vllm.platforms import current_platform

    if envs.resolve_kernel(current_platform.device_type) != "triton":
        raise MesaConfigError(
            f"--kv-cache-dtype {cache_dtype} needs the Mesa Triton kernels (a CUDA GPU); "
            f"on {current_platform.device_type} the Mesa backend runs its torch path, which "
            "keeps the cache in the model dtype: use --kv-cache-dtype auto"
        )


def apply(vllm_config: Any, prefix_caching_explicit: bool) -> MesaConfig:
    """Resolve the Mesa config and adjust the engine for it (see module docstring)."""
    check_environment()
    mesa = resolve(vllm_config)
    cache_config = vllm_config.cache_config
    check_kv_cache_dtype(cache_config.cache_dtype)
    if mesa.split == "fixed":
        # chunk boundaries do not depend on T: a token before its request's last chunk has the
        # same KV in every request sharing its prefix; vLLM's prefix caching stays as the user
        # set it (on by default), capped at each request's stable prefix by
        # patches.patch_scheduler_prefix_cache
        logger.info(
            "Mesa: split=fixed, prefix caching %s (blocks cached and hit only inside a "
            "request's stable prefix)",
            "on" if cache_config.enable_prefix_caching else "off",
        )
    else:
        if cache_config.enable_prefix_caching:
            if prefix_caching_explicit:
                raise MesaConfigError(
                    "--enable-prefix-caching is not supported with --attention-backend mesa "
                    "and mesa.split=dynamic: a cached block's keys depend on the prompt length "
                    'that chose its chunk plan. Set mesa.split to "fixed" '
                    '(--additional-config \'{"mesa": {"split": "fixed"}}\') to cache '
                    "prefixes exactly, or remove the flag (Mesa turns prefix caching off)."
                )
            cache_config.enable_prefix_caching = False
        logger.info("Mesa: prefix caching disabled (chunk plans depend on the prompt length)")
    additional = dict(vllm_config.additional_config or {})
    additional["mesa"] = mesa.model_dump()
    vllm_config.additional_config = additional
    # vLLM 0.26 passes per-request prompt lengths to attention metadata only for R-SWA models
    # (CommonAttentionMetadata.rswa_prefix_lens); Mesa needs exactly those, and no other
    # component reads rswa_window (the Mesa backend ignores the window value itself).
    vllm_config.model_config.model_arch_config.rswa_window = mesa.train_len
    max_len = vllm_config.model_config.max_model_len
    params = mesa.params()
    logger.info(
        "Mesa configuration: %s; max_model_len=%d (%.1fx the training length)",
        mesa.model_dump(),
        max_len,
        max_len / mesa.train_len,
    )
    if max_len > mesa.train_len and mesa.pe == "stair" and params.stair_width is not None:
        _warn_stair_span(max_len, params)
    return mesa


def _warn_stair_span(max_len: int, params: MesaParams) -> None:
    """Warn when a stair span up to ``max_len`` reaches train_len (a fixed stair width only:
    ``apply`` skips it for ``stair_width: auto``, where E(n) keeps every span <= L - 1 by
    construction)."""
    worst = worst_stair_span(max_len, params)
    if worst is None or worst.span < params.train_len:
        return
    prompts = worst_stair_span(max_len, params, decode=False)
    assert prompts is not None
    L = params.train_len
    if worst.prompt_len == worst.seq_len:
        where = f"the last token of a {worst.seq_len}-token prompt"
    else:
        prompt = (
            f"a prompt of at most {L} tokens"
            if worst.prompt_len <= L
            else f"a {worst.prompt_len}-token prompt"
        )
        where = f"token {worst.seq_len - 1} generated after {prompt}"
    if prompts.span < L:
        alone = f"prompts alone stay inside it (largest span {prompts.span})"
    else:
        alone = (
            f"prompts alone reach {prompts.span}, first at a {prompts.seq_len}-token prompt, "
            f"and need stair_width >= {_min_stair_width(max_len, params, decode=False)}"
        )
    logger.warning(
        "Mesa: with max_model_len=%d the stair positions span up to %d >= train_len=%d, "
        "first at %s; raise mesa.stair_width (now %d) to at least %d to keep every relative "
        "position of every prompt and decode length up to max_model_len inside the trained "
        "range; %s",
        max_len,
        worst.span,
        L,
        where,
        params.stair_width,
        _min_stair_width(max_len, params),
        alone,
    )


class StairSpan(NamedTuple):
    """The largest relative position a stair query sees, and where it first occurs.

    ``seq_len`` is n = p + 1 for the query at index p (for a prompt's tokens: the prompt's
    length, reached at its last token); ``prompt_len`` is a prompt length T whose chunk plan
    gives that query its chunk width: T == seq_len for a prompt's own last token, T < seq_len
    for a generated token (T = L there stands for every prompt of at most L tokens).
    """

    span: int
    seq_len: int
    prompt_len: int


def stair_query_span(p: int, width: int, stair_width: int, near_window: int = 0) -> int:
    """pos(p) - pos(0) for a stair query at index p with anchor A = stair_anchor(p + 1, C, W).

    Equals ``span_of(kC, r, E, W)`` with p = kC + r.  A generated token's anchor comes from
    n = p + 1 and the chunk width C of its prompt's plan; a prompt of T tokens gives its last
    token p = T - 1 the same anchor (n = T), and that token's span is the largest of the
    prompt's stair queries (pos is non-decreasing in the index and the keys start at 0).
    """
    a = stair_anchor(p + 1, width, near_window)
    return stair_position(p, a, stair_width) - stair_position(0, a, stair_width)


def span_of(kc: int, r: int, stair_width: int, near_window: int = 0) -> int:
    """The closed form of ``stair_query_span`` at p = kC + r (0 <= r < C, p >= W): the paper's
    anchor kC + 1 gives r + floor(kC / E); when r < W the anchor is p + 1 - W instead, and the
    span W + floor((p - W) / E).  Non-decreasing in r and in kC (at r = W - 1 the second is
    at most the first at r = W), which the candidate and search helpers below rely on."""
    if r >= near_window:
        return r + kc // stair_width
    return near_window + (kc + r - near_window) // stair_width


def width_runs(max_len: int, params: MesaParams) -> Iterator[tuple[int, int, int]]:
    """(C, T_lo, T_hi): the chunk width C of ``chunk_split`` is C for every long prompt
    length T in [T_lo, T_hi]; the runs cover (L, max_len] in order.  ``split: fixed``: one
    run, C = ``params.fixed_width`` (``middle_chunk``, default L - F).

    With X = T - Lc - F and D = L - F: X <= 0 and X mod D < Mmax give C = D; otherwise, in
    block Nq = X // D, C = X // (Nq + 1) is constant on X in [C (Nq + 1), C (Nq + 1) + Nq].
    There are O(max_len / D + D log(max_len / D)) runs.
    """
    L, F, Lc, m = params.train_len, params.first_chunk, params.last_chunk, params.max_remainder
    d = L - F
    t = L + 1
    if params.split == "fixed":
        if t <= max_len:
            yield params.fixed_width, t, max_len
        return
    while t <= max_len:
        x = t - Lc - F
        if x <= 0:
            c, x_hi = d, 0
        else:
            nq, rem = divmod(x, d)
            if rem < m:
                c, x_hi = d, nq * d + m - 1
            else:
                c = x // (nq + 1)
                x_hi = min(c * (nq + 1) + nq, nq * d + d - 1)
        t_hi = min(max_len, x_hi + Lc + F)
        yield c, t, t_hi
        t = t_hi + 1


def _block_max_candidates(lo: int, hi: int, width: int) -> tuple[int, ...]:
    """Indices p in [lo, hi] where max_p stair_query_span(p, C, E, W) over [lo, hi] is
    reached, whatever E and W: hi, and the last index before hi's block of C indices when it
    is >= lo.

    With p = kC + r, the span is ``span_of(kC, r, E, W)``: within a block (k fixed) it never
    decreases with r, and the block's last value never decreases with k.  So every p in an
    earlier block is bounded by that block's end, which is bounded by the end of block K - 1
    (K = floor(hi / C)), index KC - 1; every p in block K is bounded by hi.
    """
    prev = (hi // width) * width - 1
    return (hi, prev) if prev >= lo else (hi,)


def _first_reaching(
    lo: int, hi: int, width: int, stair_width: int, span: int, near_window: int = 0
) -> int | None:
    """The smallest p in [lo, hi] with stair_query_span(p, C, E, W) >= span, or None.

    The span never decreases within a block of C indices, and a block's maximum (its last
    index) never decreases from block to block (``span_of``); so a binary search finds the
    first whole block of [lo, hi] that reaches ``span``, the last (partial) block is tried
    after them, and a second binary search finds the index inside the block.
    """
    c = width

    def reaches(p: int) -> bool:
        return span_of(p - p % c, p % c, stair_width, near_window) >= span

    k_last = hi // c  # blocks lo // c .. k_last - 1 end inside [lo, hi], at (k + 1) C - 1
    k = _first_true(lo // c, k_last, lambda k: reaches(k * c + c - 1))
    if k == k_last and not reaches(hi):
        return None
    return _first_true(max(lo, k * c), min(hi, k * c + c - 1), reaches)


def _first_true(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """The smallest x in [lo, hi) with pred(x) for a pred false then true on [lo, hi]; hi
    when none in [lo, hi) is."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _stair_ranges(
    max_len: int, params: MesaParams, decode: bool
) -> list[tuple[int, int, int, int]]:
    """(lo, hi, C, T): the stair queries p in [lo, hi] with chunk width C (anchor of
    n = p + 1) of requests of at most max_len tokens; T is a prompt length that gives them
    (0: each p is the last token of the (p + 1)-token prompt).  Independent of E."""
    L, d = params.train_len, params.default_width
    if max_len <= L:
        return []
    if not decode:  # the last token p = T - 1 of each long prompt, C constant along a run
        return [(t_lo - 1, t_hi - 1, c, 0) for c, t_lo, t_hi in width_runs(max_len, params)]
    # Every index p in [T - 1, max_len - 1] of a long prompt T (its last prompt token and its
    # generated tokens) and p in [L, max_len - 1] of a short one (C = D) has the anchor of
    # n = p + 1 and C = C(T); for one C the union of these ranges is [lo_C, max_len - 1].
    first: dict[int, int] = {d: L}  # C -> a prompt length with that width (L: any short one)
    for c, t_lo, _ in width_runs(max_len, params):
        first.setdefault(c, t_lo)
    return [(L if c == d else t - 1, max_len - 1, c, t) for c, t in first.items()]


def worst_stair_span(max_len: int, params: MesaParams, decode: bool = True) -> StairSpan | None:
    """The largest relative position pos(p) - pos(0) any stair query sees in a request of at
    most ``max_len`` tokens, exactly, and the smallest sequence length where it is reached;
    None when no query is a stair query (max_len <= L).

    Stair queries (plan.token_segment_key): the last chunk of a prompt of T > L tokens
    (anchor of n = T) and, with ``decode``, every generated token at index p with n = p + 1 > L
    (anchor of n); both use the chunk width C of the prompt's plan (C = L - F for T <= L).
    Sequence lengths n up to max_len are covered (vLLM's last query has n = max_len - 1).
    A prompt's largest span is at its last token p = T - 1 (positions never decrease with the
    index), s(p, C) = (p mod C) + floor(C floor(p / C) / E) (``stair_query_span``), which only
    ever drops at a multiple of C, so on each range of indices sharing one C its maximum is at
    the range's end or just before the end's block (``_block_max_candidates``).  The ranges
    (``_stair_ranges``): without ``decode`` the runs of prompt lengths with one C
    (``width_runs``), p = T - 1; with it, per C, every p from the smallest T - 1 with that C
    (L for C = L - F) to max_len - 1.  Middle and causal queries see at most F + C - 1 <= L - 1
    and are not counted here.  O(max_len / (L - F) + (L - F) log(max_len)).

    ``seq_len`` is T for a prompt's tokens and p + 1 for a generated token; ties between
    prompts and generated tokens at one sequence length go to the prompt.  A fixed stair
    width only (ValueError for ``stair_width: auto``, whose spans are all <= L - 1).
    """
    if params.stair_width is None:
        raise ValueError("worst_stair_span needs a fixed stair_width (auto spans fit L)")
    ranges = _stair_ranges(max_len, params, decode)
    if not ranges:
        return None
    e, w = params.stair_width, params.near_window
    span = max(
        stair_query_span(p, c, e, w)
        for lo, hi, c, _ in ranges
        for p in _block_max_candidates(lo, hi, c)
    )
    best: tuple[int, bool, int] | None = None
    for lo, hi, c, t in ranges:
        p = _first_reaching(lo, hi, c, e, span, w)
        if p is None:
            continue
        if t == 0 or chunk_split(p + 1, params).width == c:
            t = p + 1  # the query is (also) the last token of a (p + 1)-token prompt
        key = (p, t != p + 1, t)
        if best is None or key < best:
            best = key
    assert best is not None
    return StairSpan(span, best[0] + 1, best[2])


def _min_stair_width(max_len: int, params: MesaParams, decode: bool = True) -> int:
    """The smallest E >= 1 for which every stair span up to ``max_len`` is below train_len.

    One always exists: spans never grow with E, and for E > max_len - 1 they are p mod C or
    W, both <= L - F - 1.  The candidate queries of ``_block_max_candidates`` do
    not depend on E, so a binary search evaluates only them.
    """
    cands = {  # stair_query_span(p, C, E, W) = span_of(kC, r, E, W), r = p mod C, kC = p - r
        (p - p % c, p % c)
        for lo, hi, c, _ in _stair_ranges(max_len, params, decode)
        for p in _block_max_candidates(lo, hi, c)
    }
    front, top_r = [], -1  # drop (kC, r) with another of both kC' >= kC and r' >= r
    for kc, r in sorted(cands, reverse=True):
        if r > top_r:
            front.append((kc, r))
            top_r = r

    def fits(e: int) -> bool:
        return all(span_of(kc, r, e, params.near_window) < params.train_len for kc, r in front)

    return _first_true(1, max(1, max_len), fits)  # fits(max_len) holds


def params_from_vllm_config(vllm_config: Any) -> MesaParams:
    """MesaParams of an engine whose config went through ``apply`` (train_len resolved)."""
    mesa = MesaConfig.from_additional_config(vllm_config.additional_config)
    mesa = mesa.resolved(
        model_train_len(vllm_config.model_config.hf_text_config),
        vllm_config.model_config.max_model_len,
    )
    return mesa.params()
