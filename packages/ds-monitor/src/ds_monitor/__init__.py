"""ds-monitor: Training monitors (TensorBoard, CSV, W&B, Comet), timers, throughput, memory stats and plots."""

from ds_monitor import tags
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
from ds_monitor.flops import count_params, dense_transformer_flops, measure_flops, training_step_flops
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
from ds_monitor.throughput import ThroughputTimer
from ds_monitor.timers import Timer, Timers

__version__ = "0.1.0"

__all__ = [
    "CSVConfig",
    "CSVMonitor",
    "CSVMonitorConfig",
    "CometConfig",
    "CometMonitor",
    "FlopsProfilerConfig",
    "Monitor",
    "MonitorConfig",
    "MonitorMaster",
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
    "tags",
    "training_step_flops",
]
