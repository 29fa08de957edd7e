"""What the Mesa backend changes in vLLM's engine configuration, decided once at startup.

Runs in the process that builds the ``VllmConfig`` (the API server / ``LLM``), before it is
sent to the engine core and the workers, so every process sees the same resolved settings:

* validate ``additional_config["mesa"]`` (MesaConfig) and fill ``train_len`` from the model;
* validate the ``MESA_VLLM_*`` environment variables (``mesa_vllm.envs``), so a bad value
  stops start-up here, named, before a worker reads it;
* refuse architectures and rope types Mesa does not support, naming them;
* prefix caching off: a cached block's KV depends on the prompt length that chose its chunk
  plan, so blocks cannot be shared between prompts (an explicit ``--enable-prefix-caching`` is
  refused);
* ask vLLM for per-request prompt lengths in the attention metadata (``rswa_window``);
* warn when the stair positions at ``max_model_len`` reach beyond the trained length.
"""

from __future__ import annotations

import logging
from typing import Any

from mesa_vllm import envs
from mesa_vllm.config import MesaConfig, MesaConfigError
from mesa_vllm.plan import MesaParams, max_stair_distance

logger = logging.getLogger("vllm.mesa_vllm")

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Phi3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
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
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MesaConfigError(
            f"--attention-backend mesa does not support architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hf = model_config.hf_text_config
    rope = rope_type_of(hf)
    if rope not in SUPPORTED_ROPE_TYPES:
        raise MesaConfigError(
            f"--attention-backend mesa does not support rope type {rope!r} of this model; "
            f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
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
    for read in (envs.mesa_kernel, envs.fresh_prefill_fa, envs.decode_kernel_options):
        try:
            read()
        except ValueError as exc:
            raise MesaConfigError(str(exc)) from None


def apply(vllm_config: Any, prefix_caching_explicit: bool) -> MesaConfig:
    """Resolve the Mesa config and adjust the engine for it (see module docstring)."""
    check_environment()
    mesa = resolve(vllm_config)
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        if prefix_caching_explicit:
            raise MesaConfigError(
                "--enable-prefix-caching is not supported with --attention-backend mesa: a "
                "cached block's keys depend on the prompt length that chose its chunk plan. "
                "Remove the flag (Mesa turns prefix caching off)."
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
    params = to_params(mesa)
    logger.info(
        "Mesa configuration: %s; max_model_len=%d (%.1fx the training length)",
        mesa.model_dump(),
        max_len,
        max_len / mesa.train_len,
    )
    if max_len > mesa.train_len and mesa.pe == "stair":
        reach = max_stair_distance(max_len, params)
        if reach >= mesa.train_len:
            logger.warning(
                "Mesa: at max_model_len=%d the stair positions span %d > train_len=%d; "
                "raise mesa.stair_width (now %d) to at least %d to keep every relative "
                "position inside the trained range",
                max_len,
                reach,
                mesa.train_len,
                mesa.stair_width,
                _min_stair_width(max_len, params),
            )
    return mesa


def _min_stair_width(max_len: int, params: MesaParams) -> int:
    e = params.stair_width
    while e < max_len:
        e += 1
        p = MesaParams(**{**params.__dict__, "stair_width": e})
        if max_stair_distance(max_len, p) < params.train_len:
            return e
    return e


def to_params(mesa: MesaConfig) -> MesaParams:
    assert mesa.train_len is not None and mesa.chunked_prefill is not None, "resolve first"
    return MesaParams(
        train_len=mesa.train_len,
        # unused without chunked prefill; clamped so MesaParams' own check holds
        first_chunk=min(mesa.first_chunk, mesa.train_len - 2),
        last_chunk=mesa.last_chunk,
        max_remainder=mesa.max_remainder,
        stair_width=mesa.stair_width,
        log_n_scaling=bool(mesa.log_n_scaling),
        pe=mesa.pe,
        chunked_prefill=mesa.chunked_prefill,
        window=mesa.window or 0,
        leaky_factor=float(mesa.leaky_factor or 1.0),
        group_size=mesa.group_size or 1,
        sink_tokens=mesa.sink_tokens,
    )


def params_from_vllm_config(vllm_config: Any) -> MesaParams:
    """MesaParams of an engine whose config went through ``apply`` (train_len resolved)."""
    mesa = MesaConfig.from_additional_config(vllm_config.additional_config)
    mesa = mesa.resolved(
        model_train_len(vllm_config.model_config.hf_text_config),
        vllm_config.model_config.max_model_len,
    )
    return to_params(mesa)
