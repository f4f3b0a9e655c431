"""ds-monitor: Training monitors (TensorBoard, CSV, W&B, Comet), timers, throughput, memory stats and plots.

Names are imported on first use, so ``ds-monitor plot`` and the config models load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ds_monitor.config import (
    CometConfig,
    CSVConfig,
    CSVMonitorConfig,
    FlopsProfilerConfig,
    MonitorConfig,
    TensorBoardConfig,
    WandbConfig,
    get_monitor_config,
)

__version__ = "0.1.0"

_LAZY = {
    "tags": "ds_monitor.tags",
    "FlopsProfile": "ds_monitor.flops",
    "profile_training_step": "ds_monitor.flops",
    "count_params": "ds_monitor.flops",
    "dense_transformer_flops": "ds_monitor.flops",
    "measure_flops": "ds_monitor.flops",
    "training_step_flops": "ds_monitor.flops",
    "format_memory_stats": "ds_monitor.memory",
    "memory_events": "ds_monitor.memory",
    "memory_stats": "ds_monitor.memory",
    "CometMonitor": "ds_monitor.monitors",
    "CSVMonitor": "ds_monitor.monitors",
    "Monitor": "ds_monitor.monitors",
    "MonitorMaster": "ds_monitor.monitors",
    "TensorBoardMonitor": "ds_monitor.monitors",
    "WandbMonitor": "ds_monitor.monitors",
    "get_rank": "ds_monitor.monitors",
    "ProgressBar": "ds_monitor.progress",
    "ThroughputTimer": "ds_monitor.throughput",
    "Timer": "ds_monitor.timers",
    "Timers": "ds_monitor.timers",
}

if TYPE_CHECKING:
    from ds_monitor import tags
    from ds_monitor.flops import (
        FlopsProfile,
        count_params,
        dense_transformer_flops,
        measure_flops,
        profile_training_step,
        training_step_flops,
    )
    from ds_monitor.memory import format_memory_stats, memory_events, memory_stats
    from ds_monitor.monitors import (
        CometMonitor,
        CSVMonitor,
        Monitor,
        MonitorMaster,
        TensorBoardMonitor,
        WandbMonitor,
        get_rank,
    )
    from ds_monitor.progress import ProgressBar
    from ds_monitor.throughput import ThroughputTimer
    from ds_monitor.timers import Timer, Timers


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ds_monitor' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CSVConfig",
    "CSVMonitor",
    "CSVMonitorConfig",
    "CometConfig",
    "CometMonitor",
    "FlopsProfile",
    "FlopsProfilerConfig",
    "Monitor",
    "MonitorConfig",
    "MonitorMaster",
    "ProgressBar",
    "TensorBoardConfig",
    "TensorBoardMonitor",
    "ThroughputTimer",
    "Timer",
    "Timers",
    "WandbConfig",
    "WandbMonitor",
    "__version__",
    "count_params",
    "dense_transformer_flops",
    "format_memory_stats",
    "get_monitor_config",
    "get_rank",
    "measure_flops",
    "memory_events",
    "memory_stats",
    "profile_training_step",
    "tags",
    "training_step_flops",
]
