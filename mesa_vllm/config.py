"""MesaConfig: the one validated place for Mesa-Extrapolation settings.

Read from ``--additional-config '{"mesa": {...}}'`` (``VllmConfig.additional_config``).
Defaults follow the paper / official code (F=100, Lc=512, Mmax=200, E=50, log-n on);
``train_len`` defaults to the model's trained context (HF ``max_position_embeddings`` before
any override).  Imports no vLLM.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class MesaConfigError(ValueError):
    """Invalid Mesa configuration; the message names the field and the allowed range."""


class MesaConfig(BaseModel):
    """Mesa-Extrapolation parameters (DESIGN.md section 3 notation in brackets)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    train_len: int | None = Field(
        default=None, ge=2, description="[L] trained context length; default: from the model"
    )
    first_chunk: int = Field(default=100, ge=1, description="[F] attention-sink chunk width")
    last_chunk: int = Field(default=512, ge=1, description="[Lc] last-chunk target width")
    max_remainder: int = Field(default=200, ge=0, description="[Mmax] DynamicSplit threshold")
    stair_width: int = Field(default=50, ge=1, description="[E] Stair PE step width")
    log_n_scaling: bool = Field(default=True, description="scale last/decode queries by log-n")

    @model_validator(mode="after")
    def _check_chunks_fit(self) -> MesaConfig:
        # L - F >= 2 keeps every DynamicSplit chunk width >= 1
        if self.train_len is not None and self.first_chunk > self.train_len - 2:
            raise ValueError(
                f"first_chunk={self.first_chunk} must be < train_len - 1 = {self.train_len - 1} "
                f"(allowed range: 1 .. {self.train_len - 2})"
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

    def resolved(self, model_train_len: int) -> MesaConfig:
        """Fill ``train_len`` from the model when the user left it unset, and re-validate."""
        if self.train_len is not None:
            return self
        return MesaConfig.from_dict({**self.model_dump(), "train_len": int(model_train_len)})


_RANGES = {
    "train_len": "an integer >= 2",
    "first_chunk": "an integer >= 1 and <= train_len - 2",
    "last_chunk": "an integer >= 1",
    "max_remainder": "an integer >= 0",
    "stair_width": "an integer >= 1",
    "log_n_scaling": "true or false",
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
        parts.append(f"mesa.{loc}: {err['msg']}, got {err.get('input')!r}{hint}")
    return "invalid Mesa configuration: " + "; ".join(parts)
