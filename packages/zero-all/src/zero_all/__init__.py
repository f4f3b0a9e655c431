"""zero-all: DeepSpeed-compatible training engine for PyTorch.

``import zero_all as deepspeed`` and keep your ``ds_config.json`` and loop::

    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(model=model, config="ds_config.json")

DeepSpeed's other names live where DeepSpeed keeps them: ``zero_all.comm`` (``deepspeed.comm``),
``zero_all.accelerator.get_accelerator`` (``deepspeed.accelerator``), ``zero_all.ops.adam``,
``zero_all.lr_schedules`` (``deepspeed.runtime.lr_schedules``), ``zero_all.utils.zero_to_fp32``
``zero_all.estimators`` (the ZeRO memory estimators) and ``zero_all.zero`` (``deepspeed.zero``: ``Init``,
``GatheredParameters``).
"""

from act_ckpt import checkpointing
from zero_all import comm, ops, zero
from zero_all.accelerator import get_accelerator
from zero_all.api import add_config_arguments, initialize
from zero_all.checkpoint.files import CheckpointCorruptError, CheckpointError
from zero_all.config import ConfigError, ZeroAllConfig, load_config
from zero_all.config.ds_config import DeepSpeedConfig, DeepSpeedConfigError
from zero_all.distributed import init_distributed
from zero_all.engine import Engine
from zero_all.lr_schedules import add_tuning_arguments

__version__ = "0.1.0"

DeepSpeedEngine = Engine
"""DeepSpeed's name for the engine class."""

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "ConfigError",
    "DeepSpeedConfig",
    "DeepSpeedConfigError",
    "DeepSpeedEngine",
    "Engine",
    "ZeroAllConfig",
    "__version__",
    "add_config_arguments",
    "add_tuning_arguments",
    "checkpointing",
    "comm",
    "get_accelerator",
    "init_distributed",
    "initialize",
    "load_config",
    "ops",
    "zero",
]
