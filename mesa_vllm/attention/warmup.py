"""Start-up compilation of the Mesa Triton kernels, so that no request waits for one.

vLLM warms a model with dummy steps that carry no attention metadata and with CUDA-graph
captures of pure decode batches; fresh prompts within L go to FlashAttention.  The Mesa
prefill kernel, and the decode kernel in eager mode, would otherwise compile on the first
request that needs them (past L, or split across steps by the scheduler), while it and its
batch wait.  Launch parameters that follow the batch are not specialised on
(``mesa_vllm.ops.triton.jit.TABLE_POINTERS`` / ``SPLIT_ARGS``), so one launch per kernel per
attention group compiles every variant serving will use.
"""

from __future__ import annotations


def warm_up_runner(model_runner) -> int:
    """Launch both Triton kernels once for every Mesa attention group of ``model_runner``
    (vLLM's GPU model runner, after its KV cache is bound), on the group's first layer.
    Returns the number of groups launched (0 on the torch path)."""
    from mesa_vllm.attention.backend import MesaAttentionBackend

    layers = model_runner.compilation_config.static_forward_context
    warmed = 0
    for groups in model_runner.attn_groups:
        for group in groups:
            if not issubclass(group.backend, MesaAttentionBackend):
                continue
            md = group.get_metadata_builder().warmup_metadata()
            layer = layers[group.layer_names[0]]
            if md is None or layer.impl.rope is None:
                continue
            kv_cache = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
            layer.impl.warm_up(kv_cache, md)
            warmed += 1
    return warmed


def warm_up_or_explain(model_runner) -> int:
    """``warm_up_runner``, with a failure turned into a start-up error that says what failed
    and what to do (the kernels would fail the same way on the first request)."""
    try:
        return warm_up_runner(model_runner)
    except Exception as exc:
        raise RuntimeError(
            "Mesa: compiling the Triton kernels at start-up failed "
            f"({type(exc).__name__}: {exc}). The server cannot run the Mesa Triton kernels on "
            "this device; MESA_VLLM_KERNEL=torch runs Mesa's torch path instead (slow, no "
            "CUDA graphs), or use a stock backend within the trained length."
        ) from exc
