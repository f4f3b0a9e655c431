"""``DeepSpeedConfig(config, mpu)``: DeepSpeed's config object, read-only attributes over ZeroAllConfig.

Scripts (and Hugging Face's integration) build one to ask what a ds_config means before, or
without, ``initialize()``: the batch triple resolved against the data-parallel world size
(``mpu.get_data_parallel_world_size()``, else the torch.distributed world, else 1), the ZeRO stage,
the precision, the optimizer and scheduler names and params. The config is validated as
``initialize()`` validates it (unknown keys, types, batch arithmetic are ``ConfigError``s naming
the key); "auto" values are not resolved here (``initialize()`` resolves them from its
arguments), so a batch key left at "auto" is an error.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.distributed as dist

from zero_all.config.batch import resolve_batch_sizes
from zero_all.config.loader import ConfigError, load_config_source
from zero_all.config.model import ZeroAllConfig

__all__ = ["DeepSpeedConfig", "DeepSpeedConfigError"]

DeepSpeedConfigError = ConfigError
"""DeepSpeed's name for a config error."""


def _data_parallel_world(mpu: Any) -> tuple[int, int]:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if mpu is not None:
        if hasattr(mpu, "get_data_parallel_world_size"):
            return rank, int(mpu.get_data_parallel_world_size())
        raise ConfigError("DeepSpeedConfig: mpu must have get_data_parallel_world_size()")
    if dist.is_available() and dist.is_initialized():
        return rank, dist.get_world_size()
    return rank, 1


class DeepSpeedConfig:
    """A validated ds_config with DeepSpeed's attribute names (see the module docstring).

    Args:
        config: a dict, a path to a JSON/hjson file, a JSON/hjson string or a base64-encoded one.
        mpu: a model-parallel unit; only ``get_data_parallel_world_size()`` is read.
        mesh_device: accepted for DeepSpeed's signature; unused.
    """

    def __init__(
        self, config: str | os.PathLike[str] | dict[str, Any], mpu: Any = None, mesh_device: Any = None
    ) -> None:
        del mesh_device
        raw = load_config_source(config)
        self._param_dict: dict[str, Any] = raw
        self.global_rank, self.world_size = _data_parallel_world(mpu)
        cfg = ZeroAllConfig.from_dict(raw, warn=False)
        self._config = cfg
        keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
        auto = [k for k in keys if getattr(cfg, k) == "auto"]
        if auto:
            raise ConfigError(
                f"DeepSpeedConfig: {', '.join(auto)} is 'auto'; 'auto' is resolved by initialize() from its "
                "arguments; give numbers here"
            )
        batch = resolve_batch_sizes(
            cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, self.world_size
        )
        self.train_batch_size = batch.train_batch_size
        self.train_micro_batch_size_per_gpu = batch.train_micro_batch_size_per_gpu
        self.gradient_accumulation_steps = batch.gradient_accumulation_steps
        self.steps_per_print = cfg.steps_per_print
        self.gradient_clipping = cfg.gradient_clipping
        self.prescale_gradients = cfg.prescale_gradients
        self.gradient_predivide_factor = cfg.gradient_predivide_factor
        self.gradient_allreduce_op = cfg.gradient_allreduce_op
        self.zero_config = cfg.zero_optimization
        self.zero_optimization_stage = int(cfg.zero_optimization.stage)
        self.zero_enabled = self.zero_optimization_stage > 0
        self.float16_config = cfg.fp16
        self.bfloat16_config = cfg.bf16
        self.fp16_enabled = cfg.fp16.enabled is True
        self.bfloat16_enabled = cfg.bf16.enabled is True
        self.optimizer_name = None if cfg.optimizer is None else cfg.optimizer.type.lower()
        self.optimizer_params = None if cfg.optimizer is None else dict(cfg.optimizer.params)
        self.optimizer_legacy_fusion = False if cfg.optimizer is None else cfg.optimizer.legacy_fusion
        self.scheduler_name = None if cfg.scheduler is None else cfg.scheduler.type
        self.scheduler_params = None if cfg.scheduler is None else dict(cfg.scheduler.params)
        self.zero_allow_untested_optimizer = cfg.zero_allow_untested_optimizer
        self.zero_force_ds_cpu_optimizer = cfg.zero_force_ds_cpu_optimizer
        self.wall_clock_breakdown = cfg.wall_clock_breakdown
        self.memory_breakdown = cfg.memory_breakdown
        self.dataloader_drop_last = cfg.dataloader_drop_last
        self.activation_checkpointing_config = cfg.activation_checkpointing
        self.grad_accum_dtype = cfg.data_types.grad_accum_dtype
        self.seed = cfg.seed

    @property
    def config(self) -> ZeroAllConfig:
        """The validated :class:`ZeroAllConfig` (what ``initialize()`` would use, before "auto")."""
        return self._config

    def print_user_config(self) -> None:
        """Print the config as given (DeepSpeed's method)."""
        print(json.dumps(self._param_dict, sort_keys=True, indent=4, separators=(",", ":")))

    def print(self, name: str) -> None:
        """Print every attribute, DeepSpeed-style (``name:`` then ``  key ... value``)."""
        print(f"{name}:")
        for key in sorted(vars(self)):
            if not key.startswith("_"):
                print(f"  {key} {'.' * (29 - len(key))} {getattr(self, key)}")

    def __repr__(self) -> str:
        return (
            f"DeepSpeedConfig(train_batch_size={self.train_batch_size}, micro={self.train_micro_batch_size_per_gpu}, "
            f"gas={self.gradient_accumulation_steps}, world_size={self.world_size}, stage={self.zero_optimization_stage})"
        )
