"""The plugin entry point: idempotent, safe in every process, loud on the wrong vLLM."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_register_is_idempotent():
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    import mesa_vllm

    mesa_vllm.register()
    patched = EngineArgs.create_engine_config
    mesa_vllm.register()
    assert EngineArgs.create_engine_config is patched  # wrapped once, not twice
    assert AttentionBackendEnum["MESA"] is AttentionBackendEnum.CUSTOM
    assert _ATTN_OVERRIDES[AttentionBackendEnum.CUSTOM].startswith("mesa_vllm.")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"):
        entry = ModelRegistry.models[arch]
        assert entry.module_name == "mesa_vllm.models.mesa_models"
    assert AttentionBackendEnum.CUSTOM.get_class().__name__ == "MesaAttentionBackend"


def test_backend_pickles_as_custom():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import mesa_vllm

    mesa_vllm.register()
    assert pickle.loads(pickle.dumps(AttentionBackendEnum["MESA"])) is AttentionBackendEnum.CUSTOM


def test_fresh_process_unpickles_before_plugins_load():
    """The spawned engine core unpickles the config before loading plugins (docs/PLATFORM.md)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import mesa_vllm

    mesa_vllm.register()
    blob = pickle.dumps(AttentionBackendEnum["MESA"])
    code = (
        "import pickle, sys; b = pickle.loads(sys.stdin.buffer.read()); "
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E; "
        "print('RESULT', b.name, E['MESA'].name, E.CUSTOM.get_path())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=blob, capture_output=True, timeout=120, check=True
    ).stdout.decode()
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    assert line.split()[1:] == [
        "CUSTOM",
        "CUSTOM",
        "mesa_vllm.attention.backend.MesaAttentionBackend",
    ]


def test_version_gate_refuses_other_vllm():
    from mesa_vllm import check_vllm_version

    check_vllm_version("0.26.0")
    check_vllm_version("0.26.0+cpu")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.26\.0 only, found vLLM 0\.27\.1"):
        check_vllm_version("0.27.1")


def test_import_does_no_torch_work():
    code = "import sys, mesa_vllm; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
        .stdout.decode()
        .split()
    )
    assert out == ["False", "False"]


def test_kernel_warmup_is_wrapped_once_and_only_once_the_worker_module_is_loaded():
    code = (
        "import sys, mesa_vllm; mesa_vllm.register(); from mesa_vllm import patches; "
        "patches.patch_kernel_warmup(); loaded = 'vllm.v1.worker.gpu_worker' in sys.modules; "
        "import vllm.v1.worker.gpu_worker as w; first = w.kernel_warmup; "
        "before = getattr(first, '_mesa_patched', False); patches.patch_kernel_warmup(); "
        "patches.patch_kernel_warmup(); print('RESULT', loaded, before, "
        "w.kernel_warmup._mesa_patched, w.kernel_warmup.__wrapped__ is first, "
        "first.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                         check=True).stdout.decode()  # fmt: skip
    result = [ln.split()[1:] for ln in out.splitlines() if ln.startswith("RESULT")][0]
    # register() never loads the worker module; once loaded, one wrap around vLLM's own
    assert result == ["False", "False", "True", "True",
                      "vllm.model_executor.warmup.kernel_warmup"]  # fmt: skip


def test_a_failing_start_up_warm_up_says_what_failed_and_what_to_do():
    """The worker's start-up compile (patch 4) over a runner whose Mesa group cannot build
    its kernels: the error names the cause and the way out."""
    from types import SimpleNamespace

    from mesa_vllm.attention.backend import MesaAttentionBackend
    from mesa_vllm.attention.warmup import warm_up_or_explain

    class Builder:
        def warmup_metadata(self):
            raise RuntimeError("out of resources: shared memory, required 263168")

    group = SimpleNamespace(backend=MesaAttentionBackend, layer_names=["l0"],
                            get_metadata_builder=Builder)  # fmt: skip
    cc = SimpleNamespace(static_forward_context={})
    runner = SimpleNamespace(attn_groups=[[group]], compilation_config=cc)
    with pytest.raises(RuntimeError) as e:
        warm_up_or_explain(runner)
    msg = str(e.value)
    assert "compiling the Triton kernels at start-up failed" in msg
    assert "out of resources: shared memory" in msg and "MESA_VLLM_KERNEL=torch" in msg
    runner.attn_groups = []  # nothing to warm: no error
    assert warm_up_or_explain(runner) == 0
