"""Every change mesa_vllm makes to vLLM 0.26.0 that has no public hook.  Idempotent.

1. ``MESA`` backend name.  Why: vLLM 0.26 has no ``AttentionBackendEnum.register`` (0.32 does),
   and a brand-new enum member breaks the spawned engine core, which unpickles the config
   before it loads plugins.  What: ``register_backend(CUSTOM, <our class>)`` (public) plus
   ``MESA`` added to the enum's name map as an alias of ``CUSTOM``, so ``--attention-backend
   mesa`` parses and pickles as CUSTOM.  Goes when: vLLM >= 0.32 (``register``).
2. ``EngineArgs.create_engine_config`` wrapper.  Why: Mesa must (a) allow ``--max-model-len``
   past the trained length without ``VLLM_ALLOW_LONG_MAX_MODEL_LEN`` (Mesa never feeds vLLM's
   rotary such positions), (b) turn prefix caching off before the engine is sized, and
   (c) validate its config at startup.  What: only when the Mesa backend is selected; stock
   backends go through untouched.  It also pins vLLM's V1 model runner
   (``VLLM_USE_V2_MODEL_RUNNER=0``, inherited by the engine processes) for Mesa: the CPU
   platform only has V1, and one runner keeps one tested path.  Goes when: vLLM offers a
   backend config hook and Mesa is validated on Model Runner V2.
   With ``split: fixed`` (mesa in ``--additional-config``) it leaves prefix caching as the
   user set it (vLLM's default: on); ``engine_config.apply`` decides the rest.
3. Prefix caching bounded by the stable prefix (``split: fixed`` only).  Why: with the fixed
   chunk plan a token's KV is shared by every request with the same prefix only before that
   request's last chunk (``plan.stable_prefix``: the last chunk's start, or L for a request
   whose prompt is at most L); last-chunk and stair-decoded tokens depend on T or p, so their
   blocks must never be cached, and a new request must recompute every token it computes as
   a stair token even when an earlier request cached that prefix as middle-chunk tokens.
   vLLM 0.26 has no per-request hook for either bound.  What: ``Scheduler.__init__`` is
   wrapped (the scheduler runs in the engine-core process, which loads the plugin, and so
   this patch, before it builds the scheduler); for a Mesa engine with ``split: fixed`` and
   prefix caching on it wraps, on that scheduler's own ``KVCacheManager`` instance, the
   coordinator's ``cache_blocks`` (the one call both ``allocate_slots``' ``num_tokens_to_cache``
   and ``KVCacheManager.cache_blocks`` go through: the token count is capped at the request's
   stable prefix, vLLM then caches only the full blocks below it, i.e. block-aligned down)
   and ``get_computed_blocks`` (during that call the coordinator's
   ``find_longest_cache_hit`` gets ``max_cache_hit_length`` capped at the new request's own
   stable prefix, so hits are full blocks inside it and vLLM's hit statistics count only
   those).  Every other engine, and every stock backend, is untouched.  Goes when: vLLM
   offers a per-request cacheable-length hook (or Mesa's plan is expressed as a KV cache
   spec).
4. Mesa kernels compiled at start-up.  Why: vLLM's warm-up runs attention with no metadata
   and captures only pure decode batches, so the Mesa Triton prefill kernel (and the decode
   kernel in eager mode) would compile on the first request that needs it, while the batch
   waits; vLLM 0.26 has no warm-up hook for an attention backend.  What: the GPU worker
   module's ``kernel_warmup`` (called once by ``Worker.compile_or_warm_up_model``, after the
   KV cache is bound and before CUDA-graph capture and vLLM's JIT monitor) is wrapped to
   call ``mesa_vllm.attention.warmup.warm_up_runner`` after it.  The wrap is made from the
   Mesa impl's constructor: by then the worker process has imported the GPU worker module,
   which the plugin's ``register`` must not import (it runs in every process, CPU ones
   too).  Other backends' engines never build a Mesa impl.  Goes when: vLLM offers a
   backend warm-up hook.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

logger = logging.getLogger("vllm.mesa_vllm")

BACKEND_PATH = "mesa_vllm.attention.backend.MesaAttentionBackend"
ALIAS = "MESA"


def register_backend_alias() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    member_map = AttentionBackendEnum._member_map_
    if member_map.get(ALIAS) is not AttentionBackendEnum.CUSTOM:
        member_map[ALIAS] = AttentionBackendEnum.CUSTOM


@contextlib.contextmanager
def _allow_long_max_model_len():
    key = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def patch_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_mesa_patched", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        from mesa_vllm.config import MesaConfigError
        from mesa_vllm.engine_config import apply, is_mesa_backend

        selected = self.attention_backend
        if selected is None and self.attention_config is not None:
            selected = getattr(self.attention_config, "backend", None)
        if not is_mesa_backend(selected):
            return original(self, *args, **kwargs)
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        explicit_prefix_caching = self.enable_prefix_caching is True
        if not explicit_prefix_caching and _split_of(self.additional_config) != "fixed":
            self.enable_prefix_caching = False
        with _allow_long_max_model_len():
            vllm_config = original(self, *args, **kwargs)
        try:
            apply(vllm_config, explicit_prefix_caching)
        except MesaConfigError as exc:
            logger.error("Mesa configuration error: %s", exc)
            raise
        return vllm_config

    create_engine_config._mesa_patched = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _split_of(additional_config) -> str:
    """The ``split`` the user asked for; "dynamic" when the config does not parse
    (``engine_config.apply`` then reports the error, naming the field)."""
    from mesa_vllm.config import MesaConfig, MesaConfigError

    try:
        return MesaConfig.from_additional_config(additional_config).split
    except MesaConfigError:
        return "dynamic"


def bound_prefix_cache(kv_cache_manager, params) -> None:
    """Patch 3 on one ``KVCacheManager`` instance: cache and hit only inside each request's
    ``plan.stable_prefix`` (``params.split == "fixed"``)."""
    from mesa_vllm.plan import stable_prefix

    coordinator = kv_cache_manager.coordinator
    if getattr(coordinator, "_mesa_bounded", False):
        return
    cache_blocks = coordinator.cache_blocks
    find_longest_cache_hit = coordinator.find_longest_cache_hit
    get_computed_blocks = kv_cache_manager.get_computed_blocks
    lookup_cap: list[int] = []  # the stable prefix of the request being looked up

    def capped_cache_blocks(request, num_computed_tokens):
        cap = stable_prefix(request.num_prompt_tokens, params)
        return cache_blocks(request, min(num_computed_tokens, cap))

    def capped_find_longest_cache_hit(block_hashes, max_cache_hit_length, *args, **kwargs):
        if lookup_cap:
            max_cache_hit_length = min(max_cache_hit_length, lookup_cap[-1])
        return find_longest_cache_hit(block_hashes, max_cache_hit_length, *args, **kwargs)

    def capped_get_computed_blocks(request):
        lookup_cap.append(stable_prefix(request.num_prompt_tokens, params))
        try:
            return get_computed_blocks(request)
        finally:
            lookup_cap.pop()

    coordinator.cache_blocks = capped_cache_blocks
    coordinator.find_longest_cache_hit = capped_find_longest_cache_hit
    kv_cache_manager.get_computed_blocks = capped_get_computed_blocks
    coordinator._mesa_bounded = True


def patch_scheduler_prefix_cache() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.__init__
    if getattr(original, "_mesa_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from mesa_vllm.engine_config import mesa_enabled, params_from_vllm_config

        vllm_config = self.vllm_config
        if not (mesa_enabled(vllm_config) and vllm_config.cache_config.enable_prefix_caching):
            return
        params = params_from_vllm_config(vllm_config)
        if params.split == "fixed":
            bound_prefix_cache(self.kv_cache_manager, params)
            logger.info("Mesa: prefix cache bounded by each request's stable prefix")

    __init__._mesa_patched = True  # type: ignore[attr-defined]
    Scheduler.__init__ = __init__


def patch_kernel_warmup() -> None:
    """Patch 4, when the GPU worker module is loaded (else a no-op: CPU workers)."""
    import sys

    worker = sys.modules.get("vllm.v1.worker.gpu_worker")
    original = getattr(worker, "kernel_warmup", None)
    if original is None or getattr(original, "_mesa_patched", False):
        return

    @functools.wraps(original)
    def kernel_warmup(gpu_worker):
        original(gpu_worker)
        from mesa_vllm.attention.warmup import warm_up_or_explain

        warmed = warm_up_or_explain(gpu_worker.model_runner)
        if warmed:
            logger.info("Mesa: Triton kernels compiled at start-up (%d attention group(s))",
                        warmed)  # fmt: skip

    kernel_warmup._mesa_patched = True  # type: ignore[attr-defined]
    worker.kernel_warmup = kernel_warmup


def apply_all() -> None:
    register_backend_alias()
    patch_create_engine_config()
    patch_scheduler_prefix_cache()
