"""Shared fixtures: project-made models, and real vLLM servers started from a shell."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/oracle.py

# Small, quick CPU engines everywhere in the suite.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLM.apply_model (inspecting the running layers) ships a function to the engine process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from mesa_vllm.testing.cases import MESA_SMALL, TRAIN_LEN  # noqa: E402,F401


def test_seed(nbytes: int = 4) -> int:
    """A fresh random seed per run, or ``MESA_TEST_SEED`` to replay a failure (every
    assertion message that depends on it prints it)."""
    return int(os.environ.get("MESA_TEST_SEED", int.from_bytes(os.urandom(nbytes), "little")))


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(model_root) -> Path:
    from mesa_vllm.testing.tiny_models import make_random_model

    return make_random_model("llama", model_root / "llama", train_len=TRAIN_LEN)


def cpu_engine_kwargs(max_model_len: int) -> dict:
    """LLM(...) arguments for a small float32 CPU engine."""
    return dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        gpu_memory_utilization=0.12,
        seed=0,
    )


def mesa_engine_kwargs(model: Path, max_model_len: int, mesa: dict, **overrides) -> dict:
    """LLM(...) arguments for a small float32 CPU engine serving ``model`` with the Mesa
    backend and the ``mesa`` settings, in 16-token cache blocks; ``overrides`` on top."""
    kw = cpu_engine_kwargs(max_model_len)
    kw.update(
        model=str(model),
        attention_backend="mesa",
        additional_config={"mesa": mesa},
        block_size=16,
    )
    kw.update(overrides)
    return kw


def interpreter_llm(env: dict[str, str] | None = None, **kw):
    """``vllm.LLM(**kw)`` on the Mesa Triton kernels under the Triton interpreter
    (MESA_VLLM_KERNEL=triton, TRITON_INTERPRET=1 and ``env`` while the engine starts: its
    processes inherit them; this process gets its values back)."""
    from vllm import LLM

    env = {"MESA_VLLM_KERNEL": "triton", "TRITON_INTERPRET": "1", **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return LLM(**kw)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cli_server(model: Path, args: list[str], log_path: Path, served_name: str = "tiny"):
    """A LocalServer started as `mesa-vllm serve MODEL ARGS` through bash (a real shell)."""
    from mesa_vllm.eval.server import LocalServer

    exe = Path(sys.executable).parent / "mesa-vllm"

    class CliServer(LocalServer):
        def command(self) -> list[str]:
            argv = [
                str(exe),
                "serve",
                str(model),
                "--served-model-name",
                served_name,
                "--host",
                self.host,
                "--port",
                str(self.port),
                *args,
            ]
            return ["bash", "-c", "exec " + shlex.join(argv)]

    return CliServer(str(model), [], log_path=log_path, served_name=served_name, timeout=400)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real model, SmolLM2-135M-Instruct (L = 8192), converted from its package."""
    from mesa_vllm.testing.real_models import smollm2

    return smollm2()


@pytest.fixture(scope="session")
def smollm2_cut(smollm2, model_root) -> Path:
    """SmolLM2-135M-Instruct cut to its first 4 layers: real weights and shapes, 7x faster."""
    from mesa_vllm.testing.real_models import truncated_copy

    return truncated_copy(smollm2, model_root / "smollm2-4l", layers=4)
