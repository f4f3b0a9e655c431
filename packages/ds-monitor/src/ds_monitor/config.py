"""Config sections for monitoring, with DeepSpeed's key names and defaults.

The engine composes these into the full ds_config model:

* ``"tensorboard"`` -> :class:`TensorBoardConfig`
* ``"csv_monitor"`` -> :class:`CSVMonitorConfig`
* ``"wandb"`` -> :class:`WandbConfig`
* ``"comet"`` -> :class:`CometConfig`
* ``"flops_profiler"`` -> :class:`FlopsProfilerConfig`

``wall_clock_breakdown`` and ``steps_per_print`` are plain top-level keys of the full config
(owned by zero-all); :class:`~ds_monitor.timers.Timers` and
:class:`~ds_monitor.throughput.ThroughputTimer` take them as arguments.

Unknown keys are errors (``extra="forbid"``), as in DeepSpeed's pydantic monitor sections.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "CSVConfig",
    "CSVMonitorConfig",
    "CometConfig",
    "FlopsProfilerConfig",
    "MonitorConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "get_monitor_config",
]

DEFAULT_JOB_NAME = "DeepSpeedJobName"


class _Section(BaseModel):
    """Common settings: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class TensorBoardConfig(_Section):
    """The ``"tensorboard"`` section: scalar event files under ``output_path/job_name``."""

    enabled: bool = False
    """Write TensorBoard event files (needs ``pip install ds-monitor[tensorboard]``)."""

    output_path: str = ""
    """Folder the logs go under; ``""`` means the current working directory (as DeepSpeed)."""

    job_name: str = DEFAULT_JOB_NAME
    """Name of this job: a sub-folder of ``output_path``."""


class CSVMonitorConfig(_Section):
    """The ``"csv_monitor"`` section: one ``<metric>.csv`` file per metric under ``output_path/job_name``."""

    enabled: bool = False
    """Write CSV files (no extra dependency)."""

    output_path: str = ""
    """Folder the files go under; ``""`` means the current working directory (as DeepSpeed)."""

    job_name: str = DEFAULT_JOB_NAME
    """Name of this job: a sub-folder of ``output_path``."""


CSVConfig = CSVMonitorConfig
"""DeepSpeed's name for :class:`CSVMonitorConfig`."""


class WandbConfig(_Section):
    """The ``"wandb"`` section. ``WANDB_MODE=offline`` (or ``WANDB_DIR``) in the environment is honored by wandb."""

    enabled: bool = False
    """Log to Weights & Biases (needs ``pip install ds-monitor[wandb]``)."""

    group: str | None = None
    """W&B group, to group runs together."""

    team: str | None = None
    """W&B team (the run's ``entity``)."""

    project: str = "deepspeed"
    """W&B project name."""


class CometConfig(_Section):
    """The ``"comet"`` section (needs ``pip install ds-monitor[comet]``); keys as DeepSpeed's CometConfig."""

    enabled: bool = False
    """Log to Comet."""

    samples_log_interval: int = Field(default=100, ge=1)
    """A metric is sent again only after this many more samples (steps) than when it was last sent."""

    project: str | None = None
    """Comet project (else COMET_PROJECT_NAME or .comet.config)."""

    workspace: str | None = None
    """Comet workspace (else COMET_WORKSPACE or .comet.config)."""

    api_key: str | None = None
    """Comet API key (else COMET_API_KEY or .comet.config)."""

    experiment_name: str | None = None
    """Display name for the experiment."""

    experiment_key: str | None = None
    """Key of the experiment: 32 to 50 alphanumeric characters."""

    online: bool | None = None
    """False stores the experiment locally (offline); None means Comet's default (online)."""

    mode: Literal["get", "create", "get_or_create"] | None = None
    """How the experiment is started: ``get``, ``create`` or ``get_or_create`` (Comet's default)."""

    @field_validator("experiment_key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9]{32,50}", value):
            raise ValueError("must be 32 to 50 alphanumeric characters")
        return value


class FlopsProfilerConfig(_Section):
    """The ``"flops_profiler"`` section (DeepSpeed's keys and defaults).

    ds-monitor counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` at ``profile_step``
    (see :func:`ds_monitor.flops.measure_flops`) and reports the model TFLOPS from it.
    """

    enabled: bool = False
    """Measure the FLOPs of one training step."""

    recompute_fwd_factor: float = Field(default=0.0, ge=0.0)
    """Extra forward passes from activation recomputation (0.0 none, 1.0 a full recompute)."""

    profile_step: int = Field(default=1, ge=0)
    """The global step at which the profile is taken."""

    module_depth: int = -1
    """Depth of the per-module breakdown (-1: all)."""

    top_modules: int = Field(default=1, ge=0)
    """How many top modules to print per depth."""

    detailed: bool = True
    """Print the per-module breakdown."""

    output_file: str | None = None
    """Write the report to this file instead of stdout."""


class MonitorConfig(_Section):
    """The monitor sections of a ds_config together (DeepSpeed's ``DeepSpeedMonitorConfig``)."""

    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    csv_monitor: CSVMonitorConfig = Field(default_factory=CSVMonitorConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    comet: CometConfig = Field(default_factory=CometConfig)

    @property
    def enabled(self) -> bool:
        """True when any monitor is enabled."""
        return self.tensorboard.enabled or self.csv_monitor.enabled or self.wandb.enabled or self.comet.enabled


_SECTIONS = ("tensorboard", "csv_monitor", "wandb", "comet")


def get_monitor_config(ds_config: dict[str, Any]) -> MonitorConfig:
    """Read the monitor sections out of a whole ds_config dict (other top-level keys are ignored).

    Raises ``ValueError`` naming the key path (e.g. ``tensorboard.enabled``) and what is accepted.
    """
    sections = {key: ds_config[key] for key in _SECTIONS if key in ds_config}
    try:
        return MonitorConfig.model_validate(sections)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``key.path: message (got VALUE)``."""
    lines = ["invalid monitor config:"]
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"])
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        lines.append(f"  {path}: {err['msg']}{got}")
    return "\n".join(lines)
