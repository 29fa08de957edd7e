"""Startup behaviour of an engine configured for Mesa: errors name the field, stock
backends keep vLLM's behaviour.  Builds vLLM's real engine config (no engine is started)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    from mesa_vllm.testing.tiny_models import make_random_model

    return make_random_model("llama", tmp_path_factory.mktemp("m") / "llama", train_len=64)


FITS_64 = {"mesa": {"first_chunk": 8}}  # the paper's first chunk (100) needs train_len > 101


def _config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    import mesa_vllm

    mesa_vllm.register()
    return EngineArgs(model=str(model), dtype="float32", **kw).create_engine_config()


def test_mesa_engine_config(tiny64):
    cfg = _config(
        tiny64,
        attention_backend="mesa",
        max_model_len=4096,
        additional_config={"mesa": {"first_chunk": 8}},
    )
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.model_config.max_model_len == 4096
    assert cfg.additional_config["mesa"]["train_len"] == 64
    assert cfg.model_config.rswa_window == 64  # prompt lengths reach the attention metadata


def test_stock_backend_keeps_vllm_length_check(tiny64, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(ValueError, match="VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        _config(tiny64, max_model_len=4096)
    cfg = _config(tiny64, max_model_len=64)
    assert cfg.model_config.rswa_window is None


@pytest.mark.parametrize(
    "mesa,needle",
    [
        ({"stair_width": 0}, "mesa.stair_width"),
        ({"first_chunk": 63}, "first_chunk=63 must be < train_len - 1"),
        ({"last_chunk": "big"}, "mesa.last_chunk"),
        ({"log_n_scaling": "on"}, "mesa.log_n_scaling"),
        ({"chunk": 3}, "mesa.chunk: unknown field"),
        ({}, "first_chunk=100 must be < train_len - 1 = 63"),  # paper default vs a 64-token model
        ({"pe": "rerope", "window": 64}, "window=64 must be <= train_len - 1 = 63"),
        ({"pe": "streaming", "chunked_prefill": True}, "chunked_prefill=true is not allowed"),
        ({"pe": "self_extend", "group_size": 0}, "mesa.group_size"),
        ({"pe": "ntk"}, "mesa.pe"),
    ],
)
def test_bad_mesa_config_fails_at_startup(tiny64, mesa, needle):
    from mesa_vllm.config import MesaConfigError

    with pytest.raises(MesaConfigError, match=needle.replace(".", r"\.")):
        _config(
            tiny64, attention_backend="mesa", max_model_len=256, additional_config={"mesa": mesa}
        )


@pytest.mark.parametrize(
    "var,value,needle",
    [
        ("MESA_VLLM_KERNEL", "cuda", "MESA_VLLM_KERNEL='cuda' is not one of auto"),
        ("MESA_VLLM_FRESH_FA", "yes", "MESA_VLLM_FRESH_FA='yes' must be 0 or 1"),
        ("MESA_VLLM_MIDDLE_FA", "on", "MESA_VLLM_MIDDLE_FA='on' must be 0, 1 or torch"),
        ("MESA_VLLM_DECODE_KERNEL", "flat_stair=1", "MESA_VLLM_DECODE_KERNEL: 'flat_stair=1'"),
        ("MESA_VLLM_DECODE_KERNEL", "tile_rows=24", "tile_rows=24 is not a power of 2"),
    ],
)
def test_bad_environment_fails_at_engine_config(tiny64, monkeypatch, var, value, needle):
    """In the front-end process, before any worker starts (the workers read them again)."""
    from mesa_vllm.config import MesaConfigError

    kw = dict(attention_backend="mesa", max_model_len=256, additional_config=FITS_64)
    monkeypatch.setenv(var, value)
    with pytest.raises(MesaConfigError, match=re.escape(needle)):
        _config(tiny64, **kw)
    monkeypatch.delenv(var)
    _config(tiny64, **kw)  # the same engine builds


def test_explicit_prefix_caching_is_refused(tiny64):
    from mesa_vllm.config import MesaConfigError

    with pytest.raises(MesaConfigError, match="--enable-prefix-caching is not supported") as e:
        _config(
            tiny64,
            attention_backend="mesa",
            max_model_len=256,
            enable_prefix_caching=True,
            additional_config={"mesa": {"first_chunk": 8}},
        )
    assert 'mesa.split to "fixed"' in str(e.value)


@pytest.mark.parametrize("dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_on_the_torch_path_is_refused(tiny64, monkeypatch, dtype):
    """The CPU runs the torch path: fp8 is refused at startup, naming the option; with the
    Triton kernels (here the interpreter) the same engine config builds."""
    from mesa_vllm.config import MesaConfigError

    kw = dict(attention_backend="mesa", max_model_len=256, additional_config=FITS_64,
              kv_cache_dtype=dtype)  # fmt: skip
    with pytest.raises(MesaConfigError, match=f"--kv-cache-dtype {dtype} needs the Mesa Triton"):
        _config(tiny64, **kw)
    monkeypatch.setenv("MESA_VLLM_KERNEL", "triton")
    assert _config(tiny64, **kw).cache_config.cache_dtype == dtype


@pytest.mark.parametrize("explicit", [None, True, False])
def test_fixed_split_keeps_prefix_caching(tiny64, explicit):
    cfg = _config(
        tiny64,
        attention_backend="mesa",
        max_model_len=256,
        enable_prefix_caching=explicit,
        additional_config={"mesa": {"first_chunk": 8, "split": "fixed"}},
    )
    assert cfg.cache_config.enable_prefix_caching is (explicit is not False)
    assert cfg.additional_config["mesa"]["split"] == "fixed"


def test_unsupported_rope_type_is_refused(tmp_path):
    from mesa_vllm.config import MesaConfigError
    from mesa_vllm.testing.tiny_models import make_random_model

    rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = make_random_model("llama", tmp_path / "yarn", train_len=64, rope_parameters=rope)
    with pytest.raises(MesaConfigError, match="rope type 'yarn'"):
        _config(model, attention_backend="mesa", max_model_len=256)


def test_unsupported_architecture_is_refused(tmp_path):
    import transformers

    from mesa_vllm.config import MesaConfigError
    from mesa_vllm.testing.tokenizer import copy_tokenizer

    cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    copy_tokenizer(tmp_path / "gpt2")
    with pytest.raises(MesaConfigError, match="does not support architecture 'GPT2LMHeadModel'"):
        _config(tmp_path / "gpt2", attention_backend="mesa", max_model_len=64)


def test_variant_defaults_resolved_from_max_model_len(tiny64):
    """Workers get the resolved variant (no 'auto' left): k and G sized for max-model-len."""
    cfg = _config(
        tiny64,
        attention_backend="mesa",
        max_model_len=2048,
        additional_config={"mesa": {"pe": "self_extend"}},
    )
    mesa = cfg.additional_config["mesa"]
    assert (mesa["window"], mesa["chunked_prefill"], mesa["log_n_scaling"]) == (32, False, False)
    G = mesa["group_size"]
    assert 2047 // G + 32 - 32 // G <= 63 < 2047 // (G - 1) + 32 - 32 // (G - 1)


def test_stair_span_warning_covers_every_length(tiny64):
    """The warning names the smallest stair_width that keeps every prompt and decode length up
    to max-model-len inside train_len, and goes away with it (not with one less)."""
    import logging

    from mesa_vllm.engine_config import (
        _min_stair_width,
        params_from_vllm_config,
        worst_stair_span,
    )

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.mesa_vllm")
    log.addHandler(handler)

    def stair_warnings(**mesa):
        records.clear()
        cfg = _config(
            tiny64,
            attention_backend="mesa",
            max_model_len=1024,
            additional_config={"mesa": {"first_chunk": 8, **mesa}},
        )
        msgs = [r.getMessage() for r in records if "stair positions" in r.getMessage()]
        return cfg, msgs

    try:
        cfg, msgs = stair_warnings()
        params = params_from_vllm_config(cfg)
        worst = worst_stair_span(1024, params)
        e = _min_stair_width(1024, params)
        assert worst.span >= 64 and e > params.stair_width
        (msg,) = msgs
        assert f"span up to {worst.span} >= train_len=64" in msg
        assert f"to at least {e} " in msg and str(worst.seq_len) in msg
        assert stair_warnings(stair_width=e)[1] == []
        assert len(stair_warnings(stair_width=e - 1)[1]) == 1
    finally:
        log.removeHandler(handler)


def test_stair_width_auto_reaches_workers_without_span_warning(tiny64):
    """stair_width "auto" survives the engine-config round trip (MesaParams.stair_width None
    in the workers) and skips the stair-span warning: every span fits by construction."""
    import logging

    from mesa_vllm.engine_config import params_from_vllm_config

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.mesa_vllm")
    log.addHandler(handler)
    try:
        cfg = _config(
            tiny64,
            attention_backend="mesa",
            max_model_len=1024,
            additional_config={"mesa": {"first_chunk": 8, "stair_width": "auto"}},
        )
    finally:
        log.removeHandler(handler)
    assert cfg.additional_config["mesa"]["stair_width"] == "auto"
    assert params_from_vllm_config(cfg).stair_width is None
    assert not [r for r in records if "stair positions" in r.getMessage()]
