"""MESA_VLLM_KERNEL selection."""

from __future__ import annotations

import pytest

from mesa_vllm.envs import resolve_kernel

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "value,device,want",
    [
        (None, "cuda", "triton"),
        (None, "cpu", "torch"),
        ("torch", "cuda", "torch"),
        ("TRITON", "cpu", "triton"),
        ("auto", "cuda", "triton"),
    ],
)
def test_resolve_kernel(monkeypatch, value, device, want):
    if value is None:
        monkeypatch.delenv("MESA_VLLM_KERNEL", raising=False)
    else:
        monkeypatch.setenv("MESA_VLLM_KERNEL", value)
    assert resolve_kernel(device) == want


def test_bad_kernel_value_names_variable(monkeypatch):
    monkeypatch.setenv("MESA_VLLM_KERNEL", "cuda")
    with pytest.raises(ValueError, match="MESA_VLLM_KERNEL='cuda' is not one of auto, torch"):
        resolve_kernel("cpu")


@pytest.mark.parametrize(
    "var,value,want",
    [
        ("MESA_VLLM_FRESH_FA", None, True),
        ("MESA_VLLM_FRESH_FA", "1", True),
        ("MESA_VLLM_FRESH_FA", "0", False),
        ("MESA_VLLM_FRESH_FA", " 0 ", False),
        ("MESA_VLLM_MIDDLE_FA", None, None),
        ("MESA_VLLM_MIDDLE_FA", "1", "flash"),
        ("MESA_VLLM_MIDDLE_FA", "0", None),
        ("MESA_VLLM_MIDDLE_FA", " Torch ", "torch"),
    ],
)
def test_flash_attention_switches(monkeypatch, var, value, want):
    from mesa_vllm import envs

    read = {
        "MESA_VLLM_FRESH_FA": envs.fresh_prefill_fa,
        "MESA_VLLM_MIDDLE_FA": envs.middle_prefill_mode,
    }
    if value is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, value)
    assert read[var]() == want


def test_bad_fresh_prefill_value_names_variable(monkeypatch):
    from mesa_vllm.envs import fresh_prefill_fa

    monkeypatch.setenv("MESA_VLLM_FRESH_FA", "yes")
    with pytest.raises(ValueError, match="MESA_VLLM_FRESH_FA='yes' must be 0 or 1"):
        fresh_prefill_fa()


@pytest.mark.parametrize(
    "value,want",
    [
        (None, {}),
        ("", {}),
        ("block_n=128, tile_rows=32", {"block_n": 128, "tile_rows": 32}),
        (
            "num_warps=8,num_stages=2,min_split_keys=256,",
            {"num_warps": 8, "num_stages": 2, "min_split_keys": 256},
        ),
        ("tail_first=0", {"tail_first": 0}),
    ],
)
def test_decode_kernel_options(monkeypatch, value, want):
    from mesa_vllm.envs import decode_kernel_options

    if value is None:
        monkeypatch.delenv("MESA_VLLM_DECODE_KERNEL", raising=False)
    else:
        monkeypatch.setenv("MESA_VLLM_DECODE_KERNEL", value)
    assert decode_kernel_options() == want


@pytest.mark.parametrize(
    "value,match",
    [
        ("block=64", "'block=64' is not key=value with a key among block_n"),
        ("tile_rows", "'tile_rows' is not key=value"),
        ("num_warps=0", "num_warps='0' is not a positive int"),
        ("block_n=6.5", "block_n='6.5' is not a positive int"),
        ("tile_rows=24", "tile_rows=24 is not a power of 2 >= 16"),
        ("block_n=48", "block_n=48 is not a power of 2 >= 16"),
        ("num_warps=3", "num_warps=3 is not a power of 2 >= 1"),
        ("tail_first=2", "tail_first='2' is not 0 or 1"),
        ("split_keys=0", "split_keys='0' is not a positive int"),
    ],
)
def test_bad_decode_kernel_option_stops_the_backend(monkeypatch, value, match):
    """The attention layer is built at engine start-up: a bad value stops it there, named."""
    from mesa_vllm.attention.backend import MesaAttentionImpl

    monkeypatch.setenv("MESA_VLLM_DECODE_KERNEL", value)
    with pytest.raises(ValueError, match="MESA_VLLM_DECODE_KERNEL: " + match):
        MesaAttentionImpl(num_heads=4, head_size=32, scale=0.2)
