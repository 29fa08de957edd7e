"""MesaConfig validation: every field, wrong types and ranges, messages naming the field."""

from __future__ import annotations

import pytest

from mesa_vllm.config import MesaConfig, MesaConfigError

pytestmark = pytest.mark.unit


def test_defaults_follow_the_paper():
    c = MesaConfig()
    assert (c.first_chunk, c.last_chunk, c.max_remainder, c.stair_width) == (100, 512, 200, 50)
    assert c.log_n_scaling is None and c.train_len is None and c.pe == "stair"
    r = c.resolved(4096)
    assert r.log_n_scaling is True and r.chunked_prefill is True and r.window is None


def test_resolved_takes_train_len_from_model_unless_set():
    assert MesaConfig().resolved(4096).train_len == 4096
    assert MesaConfig.from_dict({"train_len": 256}).resolved(4096).train_len == 256


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("train_len", 1, ">= 2"),
        ("train_len", "4096", ">= 2"),
        ("first_chunk", 0, ">= 1"),
        ("first_chunk", 2.5, ">= 1"),
        ("last_chunk", -3, ">= 1"),
        ("max_remainder", -1, ">= 0"),
        ("stair_width", 0, ">= 1"),
        ("log_n_scaling", "yes", "true or false"),
        ("log_n_scaling", 1, "true or false"),
        ("pe", "yarn", "one of stair, rerope"),
        ("chunked_prefill", "no", "true or false"),
        ("window", 0, ">= 1"),
        ("leaky_factor", 0.5, ">= 1"),
        ("group_size", 0, ">= 1"),
        ("group_size", 2.0, ">= 1"),
        ("sink_tokens", -1, ">= 0"),
        ("split", "static", 'one of "dynamic", "fixed"'),
        ("split", 1, 'one of "dynamic", "fixed"'),
        ("middle_chunk", 0, "<= train_len - first_chunk, with split: fixed"),
        ("near_window", -1, "<= train_len - first_chunk - 1, with pe: stair"),
        ("near_window", 2.5, "<= train_len - first_chunk - 1, with pe: stair"),
        ("long_query_scale", 0, "a number > 0 and <= 16"),
        ("long_query_scale", 17, "a number > 0 and <= 16"),
        ("long_query_scale", "1.5", "a number > 0 and <= 16"),
    ],
)
def test_bad_values_name_field_and_range(field, value, allowed):
    with pytest.raises(MesaConfigError) as e:
        MesaConfig.from_dict({field: value})
    msg = str(e.value)
    assert f"mesa.{field}" in msg and allowed in msg and repr(value) in msg


def test_first_chunk_must_fit_train_len():
    with pytest.raises(MesaConfigError, match=r"first_chunk=300 must be < train_len - 1 = 255"):
        MesaConfig.from_dict({"train_len": 256, "first_chunk": 300})
    with pytest.raises(MesaConfigError, match="first_chunk"):
        MesaConfig.from_dict({"first_chunk": 300}).resolved(256)


def test_middle_chunk_needs_fixed_split_and_fits_train_len():
    """middle_chunk is the fixed split's width: refused with the dynamic split, and above
    L - F once L is known (from the config or, at resolve, from the model)."""
    with pytest.raises(MesaConfigError, match="middle_chunk=64 needs split: fixed"):
        MesaConfig.from_dict({"middle_chunk": 64})
    with pytest.raises(MesaConfigError, match=r"middle_chunk=300 must be in 1 \.\. .* = 156"):
        MesaConfig.from_dict({"split": "fixed", "train_len": 256, "middle_chunk": 300})
    cfg = MesaConfig.from_dict({"split": "fixed", "middle_chunk": 300})
    with pytest.raises(MesaConfigError, match="middle_chunk=300"):
        cfg.resolved(256)
    assert cfg.resolved(8192).params().fixed_width == 300
    assert MesaConfig.from_dict({"split": "fixed"}).resolved(8192).params().fixed_width == 8092


def test_long_query_scale_needs_stair_and_reaches_the_params():
    with pytest.raises(MesaConfigError, match="long_query_scale=1.5 needs pe: stair"):
        MesaConfig.from_dict({"pe": "rerope", "long_query_scale": 1.5})
    assert MesaConfig.from_dict({"pe": "rerope"}).resolved(8192).params().long_query_scale == 1.0
    params = MesaConfig.from_dict({"long_query_scale": 2}).resolved(8192).params()
    assert params.long_query_scale == 2.0 and isinstance(params.long_query_scale, float)


def test_near_window_needs_stair_and_fits_train_len():
    """near_window W keeps n - A <= L - F - 1: refused above it once L is known (from the
    config or, at resolve, from the model), and with a weave rule."""
    with pytest.raises(MesaConfigError, match=r"near_window=156 must be 0 or in 1 \.\. .* = 155"):
        MesaConfig.from_dict({"train_len": 256, "near_window": 156})
    with pytest.raises(MesaConfigError, match="near_window=8 needs pe: stair"):
        MesaConfig.from_dict({"pe": "rerope", "near_window": 8})
    cfg = MesaConfig.from_dict({"near_window": 512})
    with pytest.raises(MesaConfigError, match="near_window=512"):
        cfg.resolved(256)
    assert cfg.resolved(8192).params().near_window == 512
    assert MesaConfig.from_dict({}).resolved(8192).params().near_window == 0


def test_unknown_field_is_refused():
    with pytest.raises(MesaConfigError, match=r"mesa\.stairwidth: unknown field"):
        MesaConfig.from_dict({"stairwidth": 10})


@pytest.mark.parametrize("raw", [[1, 2], "x", 3])
def test_non_object_is_refused(raw):
    with pytest.raises(MesaConfigError, match="JSON object"):
        MesaConfig.from_dict(raw)


def test_from_additional_config():
    assert MesaConfig.from_additional_config(None) == MesaConfig()
    assert MesaConfig.from_additional_config({"other": 1}) == MesaConfig()
    assert MesaConfig.from_additional_config({"mesa": {"stair_width": 7}}).stair_width == 7


def test_stair_width_auto():
    """stair_width takes "auto" (kept through resolve, None in MesaParams); any other string,
    a bool or a float is refused naming the field and both allowed forms."""

    c = MesaConfig.from_dict({"stair_width": "auto"})
    assert c.stair_width == "auto"
    r = c.resolved(4096, 65536)
    assert r.stair_width == "auto" and r.resolved(4096, 65536) == r
    assert MesaConfig.from_dict(r.model_dump()) == r  # the dict the workers receive
    assert r.params().stair_width is None
    assert MesaConfig().resolved(4096).params().stair_width == 50
    for bad in ("Auto", "wide", "", True, 2.0, None, [50]):
        with pytest.raises(MesaConfigError) as e:
            MesaConfig.from_dict({"stair_width": bad})
        msg = str(e.value)
        assert "mesa.stair_width" in msg and '"auto"' in msg and ">= 1" in msg, msg
        assert repr(bad) in msg


# ------------------------------------------------------------------ weave-PE variants


@pytest.mark.parametrize(
    "pe,expect",
    [
        ("rerope", dict(window=512, chunked_prefill=False, log_n_scaling=True)),
        ("leaky_rerope", dict(window=512, leaky_factor=(32768 - 1 - 512) / (4096 - 1 - 512))),
        ("self_extend", dict(window=512, group_size=10, log_n_scaling=False)),
        ("streaming", dict(window=4092, sink_tokens=4, log_n_scaling=False)),
        ("lm_infinite", dict(window=4095, chunked_prefill=False)),
    ],
)
def test_variant_defaults(pe, expect):
    r = MesaConfig.from_dict({"pe": pe}).resolved(4096, 32768)
    assert {k: getattr(r, k) for k in expect} == expect
    assert r.resolved(4096, 32768) == r  # idempotent (workers re-resolve)


@pytest.mark.parametrize("L,max_len,w", [(4096, 32768, 512), (256, 8192, 128), (64, 4096, 8)])
def test_auto_group_size_is_smallest_that_fits(L, max_len, w):
    G = MesaConfig.from_dict({"pe": "self_extend", "window": w}).resolved(L, max_len).group_size

    def top(g):
        return (max_len - 1) // g + w - w // g

    assert top(G) <= L - 1 and (G == 1 or top(G - 1) > L - 1)


def test_auto_leaky_factor_keeps_far_positions_in_range():
    r = MesaConfig.from_dict({"pe": "leaky_rerope"}).resolved(256, 8192)
    w, k = r.window, r.leaky_factor
    assert w + (8192 - 1 - w) / k == pytest.approx(255)


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"pe": "stair", "chunked_prefill": False}, "chunked_prefill=false is not allowed"),
        ({"pe": "streaming", "chunked_prefill": True}, "chunked_prefill=true is not allowed"),
        ({"pe": "lm_infinite", "chunked_prefill": True}, "chunked_prefill=true is not allowed"),
        ({"pe": "rerope", "window": 256}, "window=256 must be <= train_len - 1 = 255"),
        ({"pe": "self_extend", "window": 300}, "window=300 must be <= train_len - 1"),
        ({"pe": "streaming", "window": 255}, "sink_tokens \\+ window = 259"),
        ({"pe": "lm_infinite", "window": 256}, "window=256 must be <= train_len - 1 = 255"),
    ],
)
def test_variant_combinations_refused(raw, match):
    with pytest.raises(MesaConfigError, match=match):
        MesaConfig.from_dict({**raw, "train_len": 256})
    with pytest.raises(MesaConfigError, match=match):  # also when L comes from the model
        MesaConfig.from_dict(raw).resolved(256, 4096)
