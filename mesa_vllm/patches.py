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
        if not explicit_prefix_caching:
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


def apply_all() -> None:
    register_backend_alias()
    patch_create_engine_config()
