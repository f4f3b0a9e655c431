"""Monitors: where training scalars go (TensorBoard, CSV, Weights & Biases, Comet).

Every monitor takes DeepSpeed-style events, ``(name, value, step)`` tuples, through
:meth:`Monitor.write_events`. :class:`MonitorMaster` builds the enabled ones from their config
sections and fans the events out, on rank 0 only (other ranks hold no monitor and write nothing).

The optional libraries are imported only when their monitor is enabled; a missing one raises an
``ImportError`` that names the pip extra to install.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from ds_monitor.config import CometConfig, CSVMonitorConfig, MonitorConfig, TensorBoardConfig, WandbConfig

__all__ = [
    "CSVMonitor",
    "CometMonitor",
    "Event",
    "Monitor",
    "MonitorMaster",
    "TensorBoardMonitor",
    "WandbMonitor",
    "csv_filename",
    "get_rank",
    "log_dir",
]

Event = tuple[str, Any, int]
"""``(name, value, step)``: a scalar (float, int or 0-d tensor) logged at a step."""


def get_rank() -> int:
    """This process's global rank: torch.distributed's when initialized, else ``$RANK``, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def log_dir(output_path: str, job_name: str) -> str:
    """``output_path/job_name`` as DeepSpeed lays it out (``""`` output_path: the working directory)."""
    return os.path.join(output_path or "", job_name)


def _scalar(value: Any, name: str = "", step: Any = None) -> float:
    """A plain Python number from a float, int, numpy scalar or one-element tensor."""
    try:
        if hasattr(value, "item"):
            value = value.item()
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"monitor event {name!r} at step {step}: value must be a number or a one-element tensor, "
            f"got {type(value).__name__} {value!r:.80}"
        ) from exc


def _require(module: str, extra: str, what: str) -> Any:
    """Import an optional library or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the '{module}' package, which is not installed: {install_hint(module, extra)}"
        ) from exc


def install_hint(package: str, extra: str) -> str:
    """How to install an optional library: by name, or as ds-monitor's extra from a zero-all checkout.

    (ds-monitor is not on an index, so ``pip install 'ds-monitor[extra]'`` would find nothing.)
    """
    return (
        f"`pip install {package}`, or from a zero-all checkout "
        f"`uv pip install -c constraints.txt './packages/ds-monitor[{extra}]'`"
    )


class Monitor(ABC):
    """Something that records scalar events. Subclasses write unconditionally; rank gating is MonitorMaster's job."""

    enabled: bool = True

    @abstractmethod
    def write_events(self, events: Iterable[Event]) -> None:
        """Record ``(name, value, step)`` events."""

    def update_config(self, config: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Record the run's configuration (a JSON-able dict), where the backend supports it."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Push buffered events to storage."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release files or connections. Safe to call twice."""


class TensorBoardMonitor(Monitor):
    """Scalars into TensorBoard event files under ``output_path/job_name``.

    Uses ``torch.utils.tensorboard`` (needs the ``tensorboard`` package), else ``tensorboardX``.
    """

    def __init__(self, config: TensorBoardConfig) -> None:
        self.config = config
        self.log_dir = log_dir(config.output_path, config.job_name)
        try:
            _require("tensorboard", "tensorboard", "The TensorBoard monitor")
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter  # type: ignore[no-redef]
            except ImportError:
                raise ImportError(
                    "The TensorBoard monitor needs the 'tensorboard' package, which is not installed: "
                    + install_hint("tensorboard", "tensorboard")
                ) from None
        os.makedirs(self.log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, events: Iterable[Event]) -> None:
        """Add each event as a scalar and flush, so a live TensorBoard sees it (as DeepSpeed does)."""
        for name, value, step in events:
            self.writer.add_scalar(name, _scalar(value, name, step), int(step))
        self.writer.flush()

    def update_config(self, config: Mapping[str, Any]) -> None:
        """The config as pretty JSON text under the tag ``DeepSpeed/config`` (DeepSpeed's tag)."""
        self.writer.add_text("DeepSpeed/config", json.dumps(dict(config), indent=2, default=str), global_step=0)
        self.writer.flush()

    def flush(self) -> None:
        """Flush the event file."""
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


def csv_filename(name: str) -> str:
    """DeepSpeed's file name for a metric: ``/`` and spaces become ``_``, plus ``.csv``."""
    return name.replace("/", "_").replace(" ", "_") + ".csv"


class CSVMonitor(Monitor):
    """One CSV file per metric under ``output_path/job_name``, DeepSpeed's layout.

    ``Train/Samples/lr`` goes to ``Train_Samples_lr.csv`` with the header ``step,lr`` and one
    ``step,value`` row per event. Unlike DeepSpeed, a resumed run appends to the existing file
    without writing a second header, and a row cut short by a crash is dropped before appending.
    Files stay open between writes and are flushed after every :meth:`write_events`.
    """

    CONFIG_FILE = "deepspeed_config.csv"

    def __init__(self, config: CSVMonitorConfig) -> None:
        self.config = config
        self.log_dir = log_dir(config.output_path, config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self._files: dict[str, Any] = {}
        self._writers: dict[str, Any] = {}

    def _writer(self, name: str) -> Any:
        writer = self._writers.get(name)
        if writer is not None:
            return writer
        path = os.path.join(self.log_dir, csv_filename(name))
        fresh = _repair_tail(path)
        handle = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open across steps
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(["step", name.split("/")[-1]])
        self._files[name] = handle
        self._writers[name] = writer
        return writer

    def write_events(self, events: Iterable[Event]) -> None:
        """Append one ``step,value`` row per event; values are written with full float precision."""
        touched = set()
        for name, value, step in events:
            self._writer(name).writerow([int(step), repr(_scalar(value, name, step))])
            touched.add(name)
        for name in touched:
            self._files[name].flush()

    def update_config(self, config: Mapping[str, Any]) -> None:
        """``deepspeed_config.csv`` with ``key,value`` rows (rewritten, as DeepSpeed does)."""
        with open(os.path.join(self.log_dir, self.CONFIG_FILE), "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["key", "value"])
            for key, value in config.items():
                writer.writerow([key, json.dumps(value, default=str) if isinstance(value, dict | list) else value])

    def flush(self) -> None:
        """Flush every open file."""
        for handle in self._files.values():
            handle.flush()

    def close(self) -> None:
        """Close every open file."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._writers.clear()


def _repair_tail(path: str) -> bool:
    """Prepare ``path`` for appending; True when it is new or empty (it needs a header).

    A crash can leave a half-written last row; it is cut off so the next row starts on its own line.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return True
    if size == 0:
        return True
    with open(path, "rb+") as handle:
        handle.seek(max(0, size - 4096))
        tail = handle.read()
        if tail.endswith(b"\n"):
            return False
        cut = tail.rfind(b"\n")
        if cut < 0 and size <= 4096:
            handle.truncate(0)  # not even the header line is complete
            return True
        handle.truncate(size - len(tail) + cut + 1)
    return False


class WandbMonitor(Monitor):
    """Scalars to Weights & Biases. Set ``WANDB_MODE=offline`` to log with no network (``wandb sync`` later).

    Events with the same step are logged together as one history row.
    """

    def __init__(self, config: WandbConfig, **init_kwargs: Any) -> None:
        self.config = config
        wandb = _require("wandb", "wandb", "The W&B monitor")
        self.run = wandb.init(project=config.project, group=config.group, entity=config.team, **init_kwargs)
        self._closed = False

    def write_events(self, events: Iterable[Event]) -> None:
        """One ``run.log(row, step=step)`` per distinct step, in order of first appearance."""
        rows: dict[int, dict[str, float]] = {}
        for name, value, step in events:
            rows.setdefault(int(step), {})[name] = _scalar(value, name, step)
        for step, row in rows.items():
            self.run.log(row, step=step)

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Merge into the run's config."""
        self.run.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        """Finish the run (writes the summary and, offline, closes the run file)."""
        if not self._closed:
            self._closed = True
            self.run.finish()


class CometMonitor(Monitor):
    """Scalars to Comet (``comet_ml>=3.41``). ``online: false`` in the section stores the experiment offline.

    As in DeepSpeed, a metric is sent only when at least ``samples_log_interval`` more steps (samples)
    have passed since it was last sent.
    """

    def __init__(self, config: CometConfig) -> None:
        self.config = config
        comet_ml = _require("comet_ml", "comet", "The Comet monitor")
        self.experiment = comet_ml.start(
            api_key=config.api_key,
            project=config.project,
            workspace=config.workspace,
            experiment_key=config.experiment_key,
            mode=config.mode,
            online=config.online,
        )
        if config.experiment_name is not None:
            self.experiment.set_name(config.experiment_name)
        self._last_sent: dict[str, int] = {}

    def _due(self, name: str, step: int) -> bool:
        last = self._last_sent.get(name)
        if last is None or step - last >= self.config.samples_log_interval:
            self._last_sent[name] = step
            return True
        return False

    def write_events(self, events: Iterable[Event]) -> None:
        """``experiment.log_metric`` for each event that is due."""
        for name, value, step in events:
            if self._due(name, int(step)):
                self.experiment.log_metric(name, _scalar(value, name, step), step=int(step))

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Log the config as experiment parameters."""
        self.experiment.log_parameters(dict(config))

    def close(self) -> None:
        """End the experiment."""
        self.experiment.end()


def _section(value: Any, model: type) -> Any:
    if value is None or isinstance(value, model):
        return value
    if isinstance(value, Mapping):
        return model.model_validate(dict(value))
    raise TypeError(f"expected a {model.__name__}, a dict or None, got {type(value).__name__}")


class MonitorMaster(Monitor):
    """Fans events out to every enabled monitor, on rank 0 only.

    ``MonitorMaster(tensorboard=TensorBoardConfig(enabled=True, output_path="runs"), csv_monitor=...)``;
    each section may be a config model, a dict with DeepSpeed's keys, or None. ``rank`` defaults to
    :func:`get_rank`. ``enabled`` is True when any section is enabled, on every rank (as DeepSpeed),
    while ``is_writer`` is True only where events are actually written.
    """

    def __init__(
        self,
        tensorboard: TensorBoardConfig | Mapping[str, Any] | None = None,
        csv_monitor: CSVMonitorConfig | Mapping[str, Any] | None = None,
        wandb: WandbConfig | Mapping[str, Any] | None = None,
        comet: CometConfig | Mapping[str, Any] | None = None,
        rank: int | None = None,
    ) -> None:
        sections: list[tuple[Any, type[Monitor]]] = [
            (_section(tensorboard, TensorBoardConfig), TensorBoardMonitor),
            (_section(csv_monitor, CSVMonitorConfig), CSVMonitor),
            (_section(wandb, WandbConfig), WandbMonitor),
            (_section(comet, CometConfig), CometMonitor),
        ]
        self.rank = get_rank() if rank is None else rank
        self.enabled = any(cfg is not None and cfg.enabled for cfg, _ in sections)
        self.monitors: list[Monitor] = []
        if self.rank == 0:
            for cfg, cls in sections:
                if cfg is not None and cfg.enabled:
                    self.monitors.append(cls(cfg))

    @classmethod
    def from_config(cls, config: MonitorConfig | Mapping[str, Any], rank: int | None = None) -> MonitorMaster:
        """From a :class:`MonitorConfig` or a whole ds_config dict (only its monitor sections are read)."""
        if not isinstance(config, MonitorConfig):
            from ds_monitor.config import get_monitor_config

            config = get_monitor_config(dict(config))
        return cls(config.tensorboard, config.csv_monitor, config.wandb, config.comet, rank=rank)

    @property
    def is_writer(self) -> bool:
        """True on the rank that writes (rank 0) when a monitor is enabled."""
        return bool(self.monitors)

    def write_events(self, events: Iterable[Event]) -> None:
        """Pass the events to every monitor (a no-op on other ranks)."""
        if not self.monitors:
            return
        # Convert once (one .item() per tensor, and a bad value fails before any monitor wrote).
        events = [(name, _scalar(value, name, step), int(step)) for name, value, step in events]
        for monitor in self.monitors:
            monitor.write_events(events)

    def update_config(self, config: Mapping[str, Any]) -> None:
        """Record the run configuration in every monitor."""
        for monitor in self.monitors:
            monitor.update_config(config)

    def flush(self) -> None:
        """Flush every monitor."""
        for monitor in self.monitors:
            monitor.flush()

    def close(self) -> None:
        """Close every monitor (safe to call twice)."""
        monitors, self.monitors = self.monitors, []
        for monitor in monitors:
            monitor.close()

    def __enter__(self) -> MonitorMaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
