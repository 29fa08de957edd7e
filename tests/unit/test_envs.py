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


@pytest.mark.parametrize("value,want", [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_fresh_prefill_fa(monkeypatch, value, want):
    from mesa_vllm.envs import fresh_prefill_fa

    if value is None:
        monkeypatch.delenv("MESA_VLLM_FRESH_FA", raising=False)
    else:
        monkeypatch.setenv("MESA_VLLM_FRESH_FA", value)
    assert fresh_prefill_fa() is want


def test_bad_fresh_prefill_value_names_variable(monkeypatch):
    from mesa_vllm.envs import fresh_prefill_fa

    monkeypatch.setenv("MESA_VLLM_FRESH_FA", "yes")
    with pytest.raises(ValueError, match="MESA_VLLM_FRESH_FA='yes' must be 0 or 1"):
        fresh_prefill_fa()
