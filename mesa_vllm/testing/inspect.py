"""Introspection helpers shipped to engine processes (``LLM.apply_model`` needs importable,
module-level functions)."""

from __future__ import annotations

from torch import nn


def attention_impl_names(model: nn.Module) -> list[str]:
    """Sorted class names of every attention implementation in ``model``."""
    return sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")})
