"""ds-monitor: Training monitors (TensorBoard, CSV, W&B, Comet), timers, throughput, memory stats and plots."""

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

__all__ = [
    "CSVConfig",
    "CSVMonitorConfig",
    "CometConfig",
    "FlopsProfilerConfig",
    "MonitorConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "__version__",
    "get_monitor_config",
]
