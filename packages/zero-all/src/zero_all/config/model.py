"""The full ds_config model, composed from the sections each package owns.

``ZeroAllConfig.load(source)`` reads a path / dict / JSON string (comments allowed, duplicate
keys refused), rejects top-level keys no DeepSpeed version knows (suggesting near misses),
warns once about keys DeepSpeed knows and zero-all does not implement yet, and validates every
section. ``"auto"`` values stay as written until ``zero_all.config.auto.resolve_auto`` fills them
from initialize()'s arguments.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from zero_all.config import sections as s
from zero_all.config.known_keys import IMPLEMENTED_KEYS, KEY_ALIASES, NOT_IMPLEMENTED_KEYS, suggest
from zero_all.config.loader import ConfigError, load_config_source
from zero_all.optim import check_optimizer
from zero_all.schedulers import SCHEDULERS, scheduler_param_names, torch_scheduler_names

__all__ = ["OptimizerConfig", "SchedulerConfig", "ZeroAllConfig", "load_config"]

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(_Strict):
    """``"optimizer": {"type": ..., "params": {...}}``; see zero_all.optim for the accepted types."""

    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    legacy_fusion: bool = False
    """DeepSpeed's legacy fp16 fused-optimizer switch; accepted and ignored."""

    @model_validator(mode="after")
    def _known(self) -> OptimizerConfig:
        check_optimizer(self.type, self.params)
        return self


class SchedulerConfig(_Strict):
    """``"scheduler": {"type": ..., "params": {...}}``: one of DeepSpeed's five schedules or a torch scheduler's name."""

    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> SchedulerConfig:
        known = [*SCHEDULERS, *torch_scheduler_names()]
        if self.type not in known:
            raise ConfigError(
                f"ds_config.scheduler.type: unknown scheduler {self.type!r}{suggest(self.type, set(known))}; "
                f"accepted: {', '.join(SCHEDULERS)}, or a torch.optim.lr_scheduler class ({', '.join(known[len(SCHEDULERS) :])})"
            )
        names = scheduler_param_names(self.type)
        for key in self.params:
            if key not in names:
                raise ConfigError(
                    f"ds_config.scheduler.params.{key}: not a parameter of {self.type}{suggest(key, set(names))}; "
                    f"accepted: {', '.join(names)}"
                )
        missing = [k for k, required in names.items() if required and k not in self.params]
        if missing:
            raise ConfigError(f"ds_config.scheduler.params: {self.type} needs {', '.join(missing)}")
        return self


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""zero-all's dtype names (config values, ``consolidate --dtype``) as torch dtypes."""

# DeepSpeed's DtypeEnum spellings for the 16/32-bit float types, by canonical name.
_DTYPE_SPELLINGS = {
    "fp32": ("fp32", "float32", "float", "torch.float32"),
    "fp16": ("fp16", "float16", "half", "torch.float16"),
    "bf16": ("bf16", "bfloat16", "bfloat", "torch.bfloat16"),
}


class DataTypesConfig(_Strict):
    """DeepSpeed's ``data_types`` section."""

    grad_accum_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    """dtype gradients are accumulated and held in (ZeRO stage 2's gradient partition). None: the
    model's dtype, as in DeepSpeed; "fp32" with a bf16/fp16 model: exact accumulation for 2 more bytes
    per partitioned parameter."""

    @field_validator("grad_accum_dtype", mode="before")
    @classmethod
    def _canonical(cls, v: Any) -> Any:
        for name, spellings in _DTYPE_SPELLINGS.items():
            if isinstance(v, str) and v.lower() in spellings:
                return name
        return v


class ZeroAllConfig(_Strict):
    """Every top-level ds_config key zero-all reads, with DeepSpeed's names and defaults."""

    train_batch_size: int | Auto | None = None
    train_micro_batch_size_per_gpu: int | Auto | None = None
    gradient_accumulation_steps: int | Auto | None = None
    gradient_clipping: float | Auto = 0.0
    """Clip the global gradient norm to this value (0 = off)."""
    steps_per_print: int | None = None
    """Print loss/lr every N optimizer steps (None = never, DeepSpeed's current default)."""
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False
    prescale_gradients: bool = False
    gradient_predivide_factor: float = 1.0
    gradient_allreduce_op: Literal["mean", "sum"] = "mean"
    """How data-parallel gradients combine: "mean" (DeepSpeed's default) or "sum" (no division by the
    world size). Case-insensitive, as in DeepSpeed."""
    seed: int | None = None
    dataloader_drop_last: bool = False
    zero_allow_untested_optimizer: bool = False
    zero_force_ds_cpu_optimizer: bool = True

    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: s.FP16Config = Field(default_factory=s.FP16Config)
    bf16: s.BF16Config = Field(default_factory=s.BF16Config)
    zero_optimization: s.ZeroConfig = Field(default_factory=s.ZeroConfig)
    aio: s.AioConfig = Field(default_factory=s.AioConfig)
    activation_checkpointing: s.ActivationCheckpointingConfig = Field(default_factory=s.ActivationCheckpointingConfig)
    pipeline: s.PipelineConfig = Field(default_factory=s.PipelineConfig)
    """Pipeline engine settings (pipe3d's section: the schedule, DeepSpeed's keys)."""
    tensorboard: s.TensorBoardConfig = Field(default_factory=s.TensorBoardConfig)
    csv_monitor: s.CSVMonitorConfig = Field(default_factory=s.CSVMonitorConfig)
    wandb: s.WandbConfig = Field(default_factory=s.WandbConfig)
    comet: s.CometConfig = Field(default_factory=s.CometConfig)
    data_types: DataTypesConfig = Field(default_factory=DataTypesConfig)

    ignored_keys: list[str] = Field(default_factory=list, exclude=True)
    """Keys DeepSpeed knows that zero-all accepted and ignored (warned about once)."""

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def raw(self) -> dict[str, Any]:
        """The config as written (after dropping ignored keys), the input of "auto" resolution."""
        return self._raw

    @field_validator("gradient_allreduce_op", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("gradient_clipping", "gradient_predivide_factor")
    @classmethod
    def _non_negative(cls, v: Any, info: Any) -> Any:
        if v != "auto" and v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @classmethod
    def load(cls, source: str | os.PathLike[str] | dict[str, Any]) -> ZeroAllConfig:
        """Read and validate a ds_config; errors are ConfigError naming the key path."""
        raw = load_config_source(source)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, warn: bool = True) -> ZeroAllConfig:
        """Validate an already-parsed config dict (see ``load``)."""
        raw = dict(raw)
        for old, new in KEY_ALIASES.items():
            if old in raw:
                if new in raw:
                    raise ConfigError(
                        f"ds_config: both {old!r} and {new!r} are set; {old!r} is the old name, keep {new!r}"
                    )
                raw[new] = raw.pop(old)
        ignored = sorted(k for k in raw if k in NOT_IMPLEMENTED_KEYS)
        unknown = sorted(k for k in raw if k not in IMPLEMENTED_KEYS and k not in NOT_IMPLEMENTED_KEYS)
        if unknown:
            key = unknown[0]
            raise ConfigError(
                f"ds_config: unknown key {key!r}{suggest(key, IMPLEMENTED_KEYS | NOT_IMPLEMENTED_KEYS)}"
                + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
                + "; see docs/config.md for the accepted keys"
            )
        if ignored and warn:
            warnings.warn(
                f"ds_config: zero-all does not implement these DeepSpeed keys yet and ignores them: {', '.join(ignored)}",
                UserWarning,
                stacklevel=3,
            )
        for key in ignored:
            raw.pop(key)
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e)) from None
        cfg.ignored_keys = ignored
        cfg._raw = raw
        return cfg


def _format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "int", "float")))
        msg = err["msg"].removeprefix("Value error, ")
        if msg.startswith("ds_config"):  # our own validators already name the key path
            lines.append(msg)
            continue
        if err["type"] == "extra_forbidden":
            parent, _, key = path.rpartition(".")
            msg = f"unknown key {key!r} in {parent or 'the top level'}"
        lines.append(f"ds_config.{path}: {msg} (got {err.get('input')!r})")
    return "invalid ds_config:\n  " + "\n  ".join(dict.fromkeys(lines))


def load_config(source: str | os.PathLike[str] | dict[str, Any] | ZeroAllConfig) -> ZeroAllConfig:
    """``ZeroAllConfig.load`` that also passes a ZeroAllConfig through unchanged."""
    if isinstance(source, ZeroAllConfig):
        return source
    return ZeroAllConfig.load(source)
