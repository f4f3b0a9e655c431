"""The ds_config: loading (comments, duplicate keys), the composed model, batch arithmetic, "auto" resolution."""

from zero_all.config.batch import BatchSizes, resolve_batch_sizes
from zero_all.config.loader import ConfigError, load_config_source
from zero_all.config.model import OptimizerConfig, SchedulerConfig, ZeroAllConfig, load_config

__all__ = [
    "BatchSizes",
    "ConfigError",
    "OptimizerConfig",
    "SchedulerConfig",
    "ZeroAllConfig",
    "load_config",
    "load_config_source",
    "resolve_batch_sizes",
]
