"""MesaConfig: the one validated place for Mesa-Extrapolation settings.

Read from ``--additional-config '{"mesa": {...}}'`` (``VllmConfig.additional_config``).
Defaults follow the paper / official code (F=100, Lc=512, Mmax=200, E=50, log-n on: the
field defaults of ``mesa_vllm.plan.MesaParams``, the resolved parameters MesaConfig becomes);
``stair_width`` also takes ``"auto"`` (per stair query set, the smallest E that keeps every
relative position inside the trained range: ``mesa_vllm.plan.stair_width_for``);
``train_len`` defaults to the model's trained context (HF ``max_position_embeddings`` before
any override).  Imports no vLLM.

The flow: ``from_additional_config`` validates the user's dict (ranges here, the rules tying
fields together in ``plan.check_rules``, the per-rule defaults in ``mesa_vllm.support``);
``resolved`` fills the model's and the engine's defaults once, at startup
(``engine_config.apply``, which stores the result back in ``additional_config``); ``params``
turns a resolved config into the frozen ``MesaParams`` that workers, plan and kernels read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mesa_vllm.plan import (
    SPLITS,
    MesaParams,
    check_long_query_scale,
    check_middle_chunk,
    check_near_window,
    check_rules,
)
from mesa_vllm.support import (
    PE_NAMES,
    PE_RULES,
    default_leaky_factor,
    smallest_group_size,
)

__all__ = ["PE_NAMES", "MesaConfig", "MesaConfigError", "smallest_group_size"]


class MesaConfigError(ValueError):
    """Invalid Mesa configuration; the message names the field and the allowed range."""


PeName = Literal[PE_NAMES]
_PAPER = {f.name: f.default for f in dataclasses.fields(MesaParams)}  # F, Lc, Mmax, E


class MesaConfig(BaseModel):
    """Mesa-Extrapolation parameters (docs/CONTRACT.md notation in brackets)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    train_len: int | None = Field(
        default=None, ge=2, description="[L] trained context length; default: from the model"
    )
    first_chunk: int = Field(
        default=_PAPER["first_chunk"], ge=1, description="[F] attention-sink chunk width"
    )
    last_chunk: int = Field(
        default=_PAPER["last_chunk"], ge=1, description="[Lc] last-chunk target width"
    )
    max_remainder: int = Field(
        default=_PAPER["max_remainder"], ge=0, description="[Mmax] DynamicSplit threshold"
    )
    stair_width: int | Literal["auto"] = Field(
        default=_PAPER["stair_width"],
        description='[E] Stair PE step width; "auto": per stair query set, the smallest E '
        "keeping every relative position inside the trained range (plan.stair_width_for)",
    )
    log_n_scaling: bool | None = Field(
        default=None,
        description="scale long queries by log-n; default on for stair/rerope/leaky_rerope",
    )
    # the weave-PE family (docs/VARIANTS.md)
    pe: PeName = Field(default="stair", description="position rule of long queries")
    chunked_prefill: bool | None = Field(
        default=None, description="Mesa chunk-based prefill; default: true only for stair"
    )
    window: int | None = Field(
        default=None, ge=1, description="near window (rerope, self_extend) / local window"
    )
    leaky_factor: float | None = Field(
        default=None, ge=1.0, description="[k] leaky_rerope far compression; default: auto"
    )
    group_size: int | None = Field(
        default=None, ge=1, description="[G] self_extend group size; default: auto"
    )
    sink_tokens: int = Field(default=4, ge=0, description="[S] streaming/lm_infinite sinks")
    split: Literal[SPLITS] = Field(
        default="dynamic",
        description="chunk plan of long prompts: the paper's DynamicSplit, or fixed "
        "(middle chunks of L - F, boundaries independent of T: allows exact prefix caching)",
    )
    middle_chunk: int | None = Field(
        default=None,
        ge=1,
        description="[C] middle-chunk width of split: fixed (at most train_len - first_chunk); "
        "default: train_len - first_chunk. Narrower: fewer tokens recomputed per cached request",
    )
    near_window: int = Field(
        default=_PAPER["near_window"],
        ge=0,
        description="[W] Stair PE keeps at least the W tokens before n at their own positions "
        "(anchor at most n - W); 0: the paper's anchor, whose near window can be empty",
    )
    long_query_scale: float = Field(
        default=1.0,
        gt=0.0,
        le=16.0,
        description="[s] factor on every stair query (last chunk, decode past L) on top of "
        "log-n: attention temperature 1 / s for long queries; 1: the paper's rule",
    )

    @field_validator("stair_width", mode="plain")
    @classmethod
    def _check_stair_width(cls, value: Any) -> int | str:
        if value == "auto" and isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise ValueError("must be an integer >= 1 or the string 'auto'")

    @model_validator(mode="after")
    def _check_rules(self) -> MesaConfig:
        check_rules(self.train_len, self.first_chunk, self.pe, self.chunked_prefill)
        check_middle_chunk(self.train_len, self.first_chunk, self.split, self.middle_chunk)
        check_near_window(self.train_len, self.first_chunk, self.pe, self.near_window)
        check_long_query_scale(self.pe, self.long_query_scale)
        L, w = self.train_len, self.window  # the windows fit L (user input; see VARIANTS.md)
        if L is not None and w is not None:
            if self.pe in ("rerope", "leaky_rerope", "self_extend") and w > L - 1:
                raise ValueError(
                    f"window={w} must be <= train_len - 1 = {L - 1} for pe={self.pe!r}"
                )
            if self.pe == "streaming" and self.sink_tokens + w > L:
                raise ValueError(
                    f"sink_tokens + window = {self.sink_tokens + w} must be <= train_len = {L} "
                    "for pe='streaming'"
                )
            if self.pe == "lm_infinite" and w > L - 1:
                raise ValueError(
                    f"window={w} must be <= train_len - 1 = {L - 1} for pe='lm_infinite'"
                )
        return self

    @classmethod
    def from_dict(cls, raw: Any) -> MesaConfig:
        """Validate a user dict; raise MesaConfigError naming each bad field and its range."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise MesaConfigError(
                f"mesa config must be a JSON object, got {type(raw).__name__}: {raw!r}"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise MesaConfigError(_describe(exc)) from None

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> MesaConfig:
        """Take ``additional_config["mesa"]`` (a dict, possibly absent)."""
        if not additional_config:
            return cls()
        if not isinstance(additional_config, dict):
            raise MesaConfigError("additional_config must be a JSON object")
        return cls.from_dict(additional_config.get("mesa"))

    def resolved(self, model_train_len: int, max_model_len: int | None = None) -> MesaConfig:
        """Fill every default that depends on the model or the engine (``train_len`` from the
        model, the variant defaults of docs/VARIANTS.md from ``max_model_len``; without it,
        ``train_len`` is used) and re-validate.  Idempotent."""
        raw = self.model_dump()
        L = raw["train_len"] if raw["train_len"] is not None else int(model_train_len)
        raw["train_len"] = L
        max_len = max(int(max_model_len or L), L)
        pe = raw["pe"]
        rule = PE_RULES[pe]
        if raw["chunked_prefill"] is None:
            raw["chunked_prefill"] = bool(rule.chunked)
        if raw["log_n_scaling"] is None:
            raw["log_n_scaling"] = rule.log_n
        if raw["window"] is None and rule.weave:
            raw["window"] = rule.default_window(L, raw["sink_tokens"])
        w = raw["window"]
        if pe == "leaky_rerope" and raw["leaky_factor"] is None:
            raw["leaky_factor"] = default_leaky_factor(max_len, L, w)
        if pe == "self_extend" and raw["group_size"] is None and w <= L - 1:
            raw["group_size"] = smallest_group_size(max_len, L, w)
        return MesaConfig.from_dict(raw)

    def params(self) -> MesaParams:
        """The frozen MesaParams of a resolved config (``resolved``), which the workers, the
        plan and the kernels read; ``stair_width: "auto"`` becomes None."""
        assert self.train_len is not None and self.chunked_prefill is not None, "resolve first"
        return MesaParams(
            train_len=self.train_len,
            first_chunk=self.first_chunk,
            last_chunk=self.last_chunk,
            max_remainder=self.max_remainder,
            stair_width=None if self.stair_width == "auto" else self.stair_width,
            log_n_scaling=bool(self.log_n_scaling),
            pe=self.pe,
            chunked_prefill=self.chunked_prefill,
            window=self.window or 0,
            leaky_factor=float(self.leaky_factor or 1.0),
            group_size=self.group_size or 1,
            sink_tokens=self.sink_tokens,
            split=self.split,
            middle_chunk=self.middle_chunk,
            near_window=self.near_window,
            long_query_scale=float(self.long_query_scale),
        )


_RANGES = {
    "train_len": "an integer >= 2",
    "first_chunk": "an integer >= 1 and <= train_len - 2",
    "last_chunk": "an integer >= 1",
    "max_remainder": "an integer >= 0",
    "stair_width": 'an integer >= 1, or "auto"',
    "log_n_scaling": "true or false (default: on for stair, rerope, leaky_rerope)",
    "pe": "one of " + ", ".join(PE_NAMES),
    "chunked_prefill": "true or false (true requires a pe other than streaming/lm_infinite)",
    "window": "an integer >= 1 (< train_len for rerope/leaky_rerope/self_extend)",
    "leaky_factor": "a number >= 1",
    "group_size": "an integer >= 1",
    "sink_tokens": "an integer >= 0",
    "split": "one of " + ", ".join(f'"{s}"' for s in SPLITS),
    "middle_chunk": "an integer >= 1 and <= train_len - first_chunk, with split: fixed",
    "near_window": "0, or an integer >= 1 and <= train_len - first_chunk - 1, with pe: stair",
    "long_query_scale": "a number > 0 and <= 16 (1: off; other values with pe: stair)",
}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # a check across fields (model validator)
            parts.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        loc = ".".join(str(x) for x in err["loc"])
        field = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            parts.append(f"mesa.{loc}: unknown field (allowed: {', '.join(_RANGES)})")
            continue
        allowed = _RANGES.get(field)
        hint = f" (allowed: {allowed})" if allowed else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"mesa.{loc}: {msg}, got {err.get('input')!r}{hint}")
    return "invalid Mesa configuration: " + "; ".join(parts)
