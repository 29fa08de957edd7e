"""Evaluation methods as server launches: flags per method and settings after '@'."""

from __future__ import annotations

import json

import pytest

from mesa_vllm.config import MesaConfig
from mesa_vllm.eval import methods

pytestmark = pytest.mark.unit

CTX = methods.ServeContext("m", train_len=8192, max_model_len=20000, rope_theta=1e5)


def _mesa_config(launch: methods.Launch) -> dict:
    args = list(launch.args)
    return json.loads(args[args.index("--additional-config") + 1])["mesa"]


def test_settings_after_at_reach_the_mesa_config_and_validate():
    launch = methods.build_launch("mesa@stair_width=3@log_n_scaling=false", CTX, cpu=False)
    cfg = _mesa_config(launch)
    assert cfg == {"train_len": 8192, "stair_width": 3, "log_n_scaling": False}
    assert MesaConfig(**cfg).stair_width == 3  # the server would accept it
    auto = _mesa_config(methods.build_launch("mesa@stair_width=auto", CTX, cpu=False))
    assert auto["stair_width"] == "auto" and MesaConfig(**auto).stair_width == "auto"
    plain = _mesa_config(methods.build_launch("mesa", CTX, cpu=False))
    assert plain == {"train_len": 8192}


def test_variant_settings_keep_the_variant():
    cfg = _mesa_config(methods.build_launch("self-extend@group_size=4@window=1024", CTX, False))
    assert cfg == {"train_len": 8192, "pe": "self_extend", "group_size": 4, "window": 1024}


def test_server_flags_after_at_reach_that_method_alone_after_the_run_args():
    extra = ("--kv-cache-dtype", "auto", "--enforce-eager")
    fp8 = methods.build_launch("mesa@stair_width=3@--kv-cache-dtype=fp8", CTX, False, extra)
    args = list(fp8.args)
    assert _mesa_config(fp8) == {"train_len": 8192, "stair_width": 3}
    assert args[-2:] == ["--kv-cache-dtype", "fp8"]  # after the run's own auto: it wins
    assert args.index("--enforce-eager") < len(args) - 2
    plain = methods.build_launch("mesa", CTX, False, extra)
    assert list(plain.args)[-3:] == list(extra)
    stock = methods.build_launch("stock-raised@--kv-cache-dtype=fp8@--enforce-eager", CTX, False)
    assert list(stock.args)[-3:] == ["--kv-cache-dtype", "fp8", "--enforce-eager"]
    assert methods.parse_methods("stock@--kv-cache-dtype=fp8,mesa") == [
        "stock@--kv-cache-dtype=fp8",
        "mesa",
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("yarn@factor=2", "only Mesa-backend methods"),
        ("mesa@stair_width", "is not key=value"),
        ("nope", "unknown method 'nope'"),
        ("mesa@--=fp8", "names no flag"),
        (" , ", "no method"),
    ],
)
def test_bad_method_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        methods.parse_methods(spec)
