"""MesaConfig validation: every field, wrong types and ranges, messages naming the field."""

from __future__ import annotations

import pytest

from mesa_vllm.config import MesaConfig, MesaConfigError

pytestmark = pytest.mark.unit


def test_defaults_follow_the_paper():
    c = MesaConfig()
    assert (c.first_chunk, c.last_chunk, c.max_remainder, c.stair_width) == (100, 512, 200, 50)
    assert c.log_n_scaling is True and c.train_len is None


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
