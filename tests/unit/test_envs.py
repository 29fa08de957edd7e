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
