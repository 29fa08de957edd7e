"""Environment variables read by mesa_vllm (the only module that reads them).

MESA_VLLM_KERNEL: which attention implementation the Mesa backend runs.
    ``auto`` (default): Triton kernels on CUDA, the torch path elsewhere.
    ``torch``: the torch path everywhere (a correct fallback on any device).
    ``triton``: the Triton kernels everywhere (on the CPU only under TRITON_INTERPRET=1,
    which the tests use to check the integration against the dense oracle).
MESA_VLLM_FRESH_FA: ``1`` (default) or ``0``.  With the Triton kernels on a GPU that has
    vLLM's FlashAttention, fresh prompts no longer than the training length (plain causal
    attention, nothing cached before them) run through FlashAttention after vLLM's own
    rotary kernel, exactly as the stock backend does; ``0`` keeps them on the Mesa kernels.
MESA_VLLM_MIDDLE_FA: ``0`` (default), ``1`` or ``torch``.  With the Triton kernels on a GPU
    that has vLLM's FlashAttention, ``1`` runs the middle chunks of a prefill step as one
    varlen FlashAttention call over keys gathered from the cache and rotated by vLLM's rotary
    kernel (mesa_vllm/attention/middle_fa.py) instead of the Mesa prefill kernel.  ``torch``
    runs the same decomposition with torch's rotation and attention in their place, on any
    device (the tests run it in the engine on the CPU).  Off by default until it is measured
    on the GPU.
MESA_VLLM_DECODE_KERNEL: launch options of the Triton decode kernel, for tuning on a new GPU
    (``benchmarks/bench_kernels.py`` sweeps them), e.g. ``block_n=64,tile_rows=32``.  Keys:
    block_n, num_warps, num_stages, tile_rows, split_keys, split_programs, min_split_keys
    (positive ints) and the switches tail_first and fp8_f16_dot (0 or 1); the meaning of each is in
    ``DecodeTuning`` (mesa_vllm/ops/triton/table.py).  Unset or empty: the defaults measured
    on the H200.
MESA_VLLM_MODEL_CACHE: where ``mesa-vllm models fetch`` keeps converted models (default
    ``~/.cache/mesa_vllm/models``).
"""

from __future__ import annotations

import os
from pathlib import Path

KERNEL_CHOICES = ("auto", "torch", "triton")


def mesa_kernel() -> str:
    value = os.environ.get("MESA_VLLM_KERNEL", "auto").strip().lower()
    if value not in KERNEL_CHOICES:
        raise ValueError(f"MESA_VLLM_KERNEL={value!r} is not one of {', '.join(KERNEL_CHOICES)}")
    return value


def resolve_kernel(device_type: str) -> str:
    """``torch`` or ``triton`` for a device type (``cuda`` / ``cpu`` ...)."""
    choice = mesa_kernel()
    if choice == "auto":
        return "triton" if device_type == "cuda" else "torch"
    return choice


def fresh_prefill_fa() -> bool:
    value = os.environ.get("MESA_VLLM_FRESH_FA", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"MESA_VLLM_FRESH_FA={value!r} must be 0 or 1")
    return value == "1"


MIDDLE_FA_MODES = {"0": None, "1": "flash", "torch": "torch"}


def middle_prefill_mode() -> str | None:
    """MESA_VLLM_MIDDLE_FA as None (off), ``flash`` or ``torch``."""
    value = os.environ.get("MESA_VLLM_MIDDLE_FA", "0").strip().lower()
    if value not in MIDDLE_FA_MODES:
        raise ValueError(f"MESA_VLLM_MIDDLE_FA={value!r} must be 0, 1 or torch")
    return MIDDLE_FA_MODES[value]


DECODE_KERNEL_KEYS = (
    "block_n", "num_warps", "num_stages", "tile_rows", "split_keys", "split_programs",
    "min_split_keys", "tail_first", "fp8_f16_dot",
)  # fmt: skip
DECODE_KERNEL_SWITCHES = ("tail_first", "fp8_f16_dot")  # 0 or 1


def decode_kernel_options(value: str | None = None) -> dict[str, int]:
    """MESA_VLLM_DECODE_KERNEL (or ``value``, in its syntax) parsed into ``mesa_decode``
    keywords."""
    if value is None:
        value = os.environ.get("MESA_VLLM_DECODE_KERNEL", "")
    value = value.strip()
    options: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, number = (x.strip() for x in item.partition("="))
        if not sep or key not in DECODE_KERNEL_KEYS:
            raise ValueError(
                f"MESA_VLLM_DECODE_KERNEL: {item!r} is not key=value with a key among "
                f"{', '.join(DECODE_KERNEL_KEYS)}"
            )
        if key in DECODE_KERNEL_SWITCHES:
            if number not in ("0", "1"):
                raise ValueError(f"MESA_VLLM_DECODE_KERNEL: {key}={number!r} is not 0 or 1")
        elif not number.isdigit() or int(number) < 1:
            raise ValueError(f"MESA_VLLM_DECODE_KERNEL: {key}={number!r} is not a positive int")
        options[key] = int(number)
    from mesa_vllm.ops.triton.table import DecodeTuning

    try:
        DecodeTuning(**options)
    except ValueError as e:
        raise ValueError(f"MESA_VLLM_DECODE_KERNEL: {e}") from None
    return options


def model_cache() -> Path:
    """MESA_VLLM_MODEL_CACHE: where ``mesa-vllm models fetch`` keeps converted models
    (default ``~/.cache/mesa_vllm/models``)."""
    value = os.environ.get("MESA_VLLM_MODEL_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "mesa_vllm" / "models"
