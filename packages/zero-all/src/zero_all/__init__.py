"""zero-all: DeepSpeed-compatible training engine for PyTorch.

``import zero_all as deepspeed`` and keep your ``ds_config.json`` and loop::

    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(model=model, config="ds_config.json")
"""

from act_ckpt import checkpointing
from zero_all import zero
from zero_all.api import add_config_arguments, initialize
from zero_all.checkpoint.files import CheckpointCorruptError, CheckpointError
from zero_all.config import ConfigError, ZeroAllConfig, load_config
from zero_all.distributed import init_distributed
from zero_all.engine import Engine

__version__ = "0.1.0"

DeepSpeedEngine = Engine
"""DeepSpeed's name for the engine class."""

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "ConfigError",
    "DeepSpeedEngine",
    "Engine",
    "ZeroAllConfig",
    "__version__",
    "add_config_arguments",
    "checkpointing",
    "init_distributed",
    "initialize",
    "load_config",
    "zero",
]
