"""The ``"fp16"`` and ``"bf16"`` config sections, with DeepSpeed's key names and defaults.

The engine composes these into the full ds_config model:

* ``"fp16"`` -> :class:`FP16Config`
* ``"bf16"`` -> :class:`BF16Config` (DeepSpeed also reads the old top-level name ``"bfloat16"``;
  that alias belongs to whoever composes the full config)

Every key DeepSpeed's own models accept is accepted here; an unknown key, a wrong type or an
out-of-range value is an error that names the key path (``fp16.loss_scale_window``) and what is
accepted. ``enabled`` may be ``"auto"`` (Hugging Face's Trainer writes that and fills it in);
:func:`check_precision` refuses fp16 and bf16 both enabled.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "BF16Config",
    "FP16Config",
    "PrecisionConfig",
    "check_precision",
    "format_validation_error",
    "parse_bf16",
    "parse_fp16",
]


class _Section(BaseModel):
    """Common settings: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class FP16Config(_Section):
    """The ``"fp16"`` section: fp16 mixed precision with static or dynamic loss scaling.

    ``loss_scale`` 0 (the default) selects dynamic scaling starting at ``2**initial_scale_power``;
    any positive value is a fixed (static) scale.
    """

    enabled: bool | Literal["auto"] = False
    """Train with fp16 model weights and fp32 master weights; ``"auto"`` is filled in by the caller."""

    auto_cast: bool = False
    """Cast floating-point inputs of the model's forward to fp16 (DeepSpeed's ``fp16.auto_cast``)."""

    loss_scale: float = 0.0
    """Static loss scale; 0 means dynamic loss scaling."""

    initial_scale_power: int = Field(16, ge=0, le=64)
    """Dynamic scaling starts at ``2**initial_scale_power`` (0..64)."""

    loss_scale_window: int = Field(1000, ge=1)
    """Clean (no-overflow) steps after the last overflow before the scale doubles (>= 1)."""

    hysteresis: int = Field(2, ge=1)
    """Overflows tolerated before the scale is halved (DeepSpeed's ``delayed_shift``, >= 1)."""

    consecutive_hysteresis: bool = False
    """Refill the hysteresis on every clean step (not only when the scale grows)."""

    min_loss_scale: float = Field(1.0, gt=0)
    """Floor of the dynamic scale; an overflow at this scale raises (as DeepSpeed does)."""

    fp16_master_weights_and_grads: bool = False
    """Keep master weights and grads in fp16 (DeepSpeed: only with its CPU Adam). Accepted for
    compatibility; the engine decides whether it honours it."""

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, v: Any) -> Any:
        return _check_enabled("fp16", v)

    @field_validator("loss_scale", mode="before")
    @classmethod
    def _loss_scale(cls, v: Any) -> float:
        # bool is an int subclass: reject it explicitly, as DeepSpeed does.
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"fp16.loss_scale must be a number >= 0 (0 = dynamic), got {v!r}")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"fp16.loss_scale must be a finite number >= 0 (0 = dynamic), got {v!r}")
        return v

    @property
    def dynamic_loss_scale(self) -> bool:
        """True when the loss scale is dynamic (``loss_scale == 0``)."""
        return self.loss_scale == 0

    @property
    def initial_dynamic_scale(self) -> float:
        """``2**initial_scale_power``: the first dynamic scale."""
        return float(2**self.initial_scale_power)

    def dynamic_loss_scale_args(self) -> dict[str, Any]:
        """The keyword arguments of :class:`amp_scaler.DynamicLossScaler` this section stands for."""
        return {
            "init_scale": self.initial_dynamic_scale,
            "scale_window": self.loss_scale_window,
            "hysteresis": self.hysteresis,
            "consecutive_hysteresis": self.consecutive_hysteresis,
            "min_scale": self.min_loss_scale,
        }


class BF16Config(_Section):
    """The ``"bf16"`` section: bf16 mixed precision (no loss scaling; fp32 master weights)."""

    enabled: bool | Literal["auto"] = False
    """Train with bf16 model weights and fp32 master weights; ``"auto"`` is filled in by the caller."""

    immediate_grad_update: bool = False
    """Apply each micro-batch's gradient to the fp32 accumulator as soon as it is produced."""

    check_grad_overflow: bool = False
    """Check bf16 gradients for inf/nan and skip such steps (off by default, as in DeepSpeed)."""

    bf16_master_weights_and_grads: bool = False
    """Keep master weights and grads in bf16 for the ZeRO optimizer (DeepSpeed key; accepted)."""

    bf16_optimizer_states: bool = False
    """Keep optimizer states in bf16; only valid with ``bf16_master_weights_and_grads``."""

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, v: Any) -> Any:
        return _check_enabled("bf16", v)

    @field_validator("bf16_optimizer_states")
    @classmethod
    def _states_need_master(cls, v: bool, info: Any) -> bool:
        if v and not info.data.get("bf16_master_weights_and_grads", False):
            raise ValueError("bf16.bf16_optimizer_states needs bf16.bf16_master_weights_and_grads: true")
        return v


_TRUE = {"true", "yes", "on", "1", "t", "y"}
_FALSE = {"false", "no", "off", "0", "f", "n"}


def _check_enabled(section: str, v: Any) -> Any:
    """``enabled`` is a bool or ``"auto"``; also what DeepSpeed's pydantic bool takes (1/0, "true"/"false" ...)."""
    if isinstance(v, bool) or v == "auto":
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError(f'{section}.enabled must be true, false or "auto", got {v!r}')


def check_precision(fp16: FP16Config | None, bf16: BF16Config | None) -> None:
    """Raise ``ValueError`` when both ``fp16.enabled`` and ``bf16.enabled`` are true.

    ``"auto"`` is not "true": the caller resolves it (normally to at most one of them).
    """
    if fp16 is not None and bf16 is not None and fp16.enabled is True and bf16.enabled is True:
        raise ValueError(
            "fp16.enabled and bf16.enabled are both true; enable at most one of the 'fp16' and 'bf16' sections"
        )


class PrecisionConfig(_Section):
    """Both sections together, with the cross-check: ``{"fp16": {...}, "bf16": {...}}``.

    A convenience for users of this package alone; zero-all composes the sections itself
    and calls :func:`check_precision`.
    """

    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config)

    def model_post_init(self, __context: Any) -> None:
        """Refuse fp16 and bf16 both enabled."""
        check_precision(self.fp16, self.bf16)


def format_validation_error(section: str, err: ValidationError) -> str:
    """One line per problem, each naming the full key path (``fp16.hysteresis: ...``)."""
    lines = []
    for e in err.errors():
        path = ".".join([section, *(str(p) for p in e["loc"])])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_of(section))
            msg = f"unknown key; accepted keys: {allowed}"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def _fields_of(section: str) -> list[str]:
    model = {"fp16": FP16Config, "bf16": BF16Config}.get(section)
    return list(model.model_fields) if model else []


def _parse(section: str, model: type[_Section], d: dict[str, Any] | None) -> Any:
    if d is None:
        return model()
    if not isinstance(d, dict):
        raise ValueError(f"{section} must be a JSON object, got {type(d).__name__}")
    try:
        return model.model_validate(d)
    except ValidationError as err:
        raise ValueError(format_validation_error(section, err)) from None


def parse_fp16(d: dict[str, Any] | None) -> FP16Config:
    """Validate an ``"fp16"`` dict; errors are ``ValueError`` naming ``fp16.<key>``."""
    return _parse("fp16", FP16Config, d)


def parse_bf16(d: dict[str, Any] | None) -> BF16Config:
    """Validate a ``"bf16"`` dict; errors are ``ValueError`` naming ``bf16.<key>``."""
    return _parse("bf16", BF16Config, d)
