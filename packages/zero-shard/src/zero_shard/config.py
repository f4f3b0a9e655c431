"""The ``zero_optimization`` config section, with DeepSpeed's key names, aliases and defaults.

Mirrors ``deepspeed/runtime/zero/config.py`` (DeepSpeed 0.19): every key DeepSpeed accepts validates here,
including the stage-3, offload and ZeRO++ keys whose features come in later issues; the optimizer raises a
clear ``NotImplementedError`` at construction for a feature that is not built yet (see
:meth:`ZeroConfig.unsupported_features`). Differences from DeepSpeed, all stricter:

- an unknown key is an error naming the key (DeepSpeed agrees inside this section);
- a key given under both its names (``prefetch_bucket_size`` and ``stage3_prefetch_bucket_size``) is an error;
- ``"auto"`` (the Hugging Face Trainer convention) is accepted for ``reduce_bucket_size``,
  ``stage3_prefetch_bucket_size`` and ``stage3_param_persistence_threshold``; :meth:`ZeroConfig.resolve_auto`
  fills them from the model's hidden size the way the HF integration does, and the optimizer falls back to
  DeepSpeed's defaults for any still left at ``"auto"``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from offload_io.config import OffloadDevice, OffloadOptimizerConfig, OffloadParamConfig

__all__ = ["ZeroConfig"]

# Element counts. pydantic's lax int accepts 2e8 (a float with no fraction) and refuses 2.5.
Count = Annotated[int, Field(ge=0)]
CountOrAuto = Count | Literal["auto"]

# Deprecated DeepSpeed keys and the key that replaced them (mapped before validation, with a warning).
_DEPRECATED = {
    "cpu_offload": "offload_optimizer",
    "cpu_offload_param": "offload_param",
    "cpu_offload_use_pin_memory": "offload_optimizer.pin_memory / offload_param.pin_memory",
    "stage3_gather_fp16_weights_on_model_save": "gather_16bit_weights_on_model_save",
}

# Defaults used when a key is left at "auto" and nothing resolved it (DeepSpeed's own defaults).
AUTO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "prefetch_bucket_size": 50_000_000,
    "param_persistence_threshold": 100_000,
}


class ZeroConfig(BaseModel):
    """``zero_optimization``: ZeRO stage and its communication/memory knobs (DeepSpeed's keys and defaults)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    stage: Literal[0, 1, 2, 3] = 0
    """0 = off (plain data parallel), 1 = optimizer states partitioned, 2 = + gradients, 3 = + parameters."""
    contiguous_gradients: bool = True
    """Copy gradients into one flat buffer as they are produced (stage 2: the reduce buckets read from it)."""
    reduce_scatter: bool = True
    """Reduce gradients with reduce-scatter (or reduce) rather than all-reduce, where the backend makes that faster."""
    reduce_bucket_size: CountOrAuto = 500_000_000
    """Gradient elements reduced at a time (stage 2 launches a bucket as soon as it fills during backward)."""
    use_multi_rank_bucket_allreduce: bool = True
    """DeepSpeed: combine per-rank reduce buckets into one all-reduce (accepted; our buckets already do this)."""
    allgather_partitions: bool = True
    """All-gather updated partitions after the step (False: a series of broadcasts)."""
    allgather_bucket_size: Count = 500_000_000
    """Parameter elements all-gathered at a time after the step."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with backward. Default (None): True at stage 3, False otherwise, as DeepSpeed."""
    load_from_fp32_weights: bool = True
    """On checkpoint load, take fp32 master weights from the checkpoint rather than from the 16-bit model."""
    elastic_checkpoint: bool = False
    """Legacy DeepSpeed flag; our sharded checkpoints load at any world size regardless."""
    offload_param: OffloadParamConfig | None = None
    """Parameter offload to CPU/NVMe (stage 3 only)."""
    offload_optimizer: OffloadOptimizerConfig | None = None
    """Optimizer-state offload to CPU/NVMe (stages 1-3)."""
    zenflow: dict[str, Any] | None = None
    """DeepSpeed ZenFlow settings (accepted as-is, not built)."""
    sub_group_size: Count = 1_000_000_000
    """Tile size (elements) for the optimizer step over huge partitions (ZeRO-3 offload / Infinity)."""
    cpu_offload_param: bool | None = None
    """Deprecated: use ``offload_param``."""
    cpu_offload_use_pin_memory: bool | None = None
    """Deprecated: use ``offload_param.pin_memory`` / ``offload_optimizer.pin_memory``."""
    cpu_offload: bool | None = None
    """Deprecated: use ``offload_optimizer``."""
    prefetch_bucket_size: CountOrAuto = Field(50_000_000, alias="stage3_prefetch_bucket_size")
    """Stage 3: parameter elements fetched ahead of use."""
    param_persistence_threshold: CountOrAuto = Field(100_000, alias="stage3_param_persistence_threshold")
    """Stage 3: parameters smaller than this stay unpartitioned."""
    model_persistence_threshold: Count = Field(sys.maxsize, alias="stage3_model_persistence_threshold")
    """Stage 3: cap on the total elements kept unpartitioned by ``param_persistence_threshold``."""
    max_live_parameters: Count = Field(1_000_000_000, alias="stage3_max_live_parameters")
    """Stage 3: parameter elements resident per rank before releasing."""
    max_reuse_distance: Count = Field(1_000_000_000, alias="stage3_max_reuse_distance")
    """Stage 3: keep a parameter that will be reused within this many elements."""
    gather_16bit_weights_on_model_save: bool = Field(False, alias="stage3_gather_16bit_weights_on_model_save")
    """Stage 3: gather full 16-bit weights when saving the model."""
    module_granularity_threshold: Count = Field(0, alias="stage3_module_granularity_threshold")
    """Stage 3: fetch fine-grained modules as one unit."""
    use_all_reduce_for_fetch_params: bool = Field(False, alias="stage3_use_all_reduce_for_fetch_params")
    """Stage 3: fetch parameters with all-reduce instead of all-gather."""
    allgather_sequential: bool = Field(False, alias="stage3_allgather_sequential")
    """Stage 3: all-gather parameters one at a time, without bucketing."""
    partition_stream_chunk_size: Count = Field(0, alias="stage3_partition_stream_chunk_size")
    """Stage 3: stream very large parameters through chunks of this size while partitioning."""
    ignore_unused_parameters: bool = True
    """Stage 2: tolerate parameters that get no gradient (False: error when one is found)."""
    legacy_stage1: bool = False
    """DeepSpeed's old stage-1 implementation (accepted for compatibility; has no effect here)."""
    round_robin_gradients: bool = False
    """Stage 1/2 with CPU offload: spread gradient copies across ranks."""
    zero_hpz_partition_size: Annotated[int, Field(ge=0)] = 1
    """ZeRO++ hierarchical partitioning: ranks in the secondary parameter group (1 = off)."""
    zero_quantized_weights: bool = False
    """ZeRO++ quantized weight all-gather."""
    zero_quantized_nontrainable_weights: bool = False
    """ZeRO++: store non-trainable weights quantized."""
    zero_quantized_gradients: bool = False
    """ZeRO++ quantized gradient reduction."""
    zeropp_loco_param: dict[str, Any] | None = None
    """LoCo-ZeRO++ settings (``err_beta``, ``reset_T``)."""
    mics_shard_size: int = -1
    """MiCS: shard parameters within groups of this many ranks (-1 = off)."""
    mics_hierarchical_params_gather: bool = False
    """MiCS hierarchical all-gather."""
    memory_efficient_linear: bool = True
    """Stage 3: memory-efficient linear layer."""
    pipeline_loading_checkpoint: bool = False
    """Stage 3: force checkpoint loading in pipeline mode."""
    override_module_apply: bool = True
    """Stage 3: override ``nn.Module.apply``."""
    log_trace_cache_warnings: bool = False
    """Stage 3: log trace-cache invalidations."""
    enable_sanity_checks: bool = False
    """Extra internal consistency checks."""
    save_muon_momentum_buffer_in_memory: bool = False
    """Stage 3 NVMe offload with Muon: keep the momentum buffer in memory."""
    leaf_module: dict[str, Any] | None = None
    """Stage 3 leaf-module settings (accepted as-is, not built)."""

    @model_validator(mode="before")
    @classmethod
    def _deprecated_and_duplicate_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # A key under both of its names would silently keep one of them: refuse instead.
        for name, field in cls.model_fields.items():
            if field.alias and field.alias != name and name in data and field.alias in data:
                raise ValueError(f"zero_optimization: give either {name!r} or {field.alias!r}, not both")
        for old, new in _DEPRECATED.items():
            if old in data and data[old] is not None:
                warnings.warn(f"zero_optimization.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        if data.get("cpu_offload") and data.get("offload_optimizer") is None:
            data["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(data.get("cpu_offload_use_pin_memory"))}
        if data.get("cpu_offload_param") and data.get("offload_param") is None:
            data["offload_param"] = {"device": "cpu", "pin_memory": bool(data.get("cpu_offload_use_pin_memory"))}
        fp16_name = "stage3_gather_fp16_weights_on_model_save"
        if fp16_name in data:
            value = data.pop(fp16_name)
            if value and "gather_16bit_weights_on_model_save" not in data:
                data["stage3_gather_16bit_weights_on_model_save"] = value
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ZeroConfig:
        if self.overlap_comm is None:
            # validate_assignment would re-run this validator; write the field directly.
            self.__dict__["overlap_comm"] = self.stage == 3
        if self.offload_optimizer is not None and self.offload_optimizer.ratio < 1.0 and self.stage != 3:
            raise ValueError(
                f"zero_optimization.offload_optimizer.ratio={self.offload_optimizer.ratio}: partial optimizer "
                f"offload needs stage 3 (stage is {self.stage})"
            )
        if self.offload_optimizer is not None and self.offload_optimizer.super_offload and self.stage != 3:
            raise ValueError("zero_optimization.offload_optimizer.super_offload needs stage 3")
        if self.offload_param is not None and self.offload_param.enabled and self.stage != 3:
            raise ValueError(
                f"zero_optimization.offload_param.device={self.offload_param.device.value!r} needs stage 3 "
                f"(stage is {self.stage}); for stages 1-2 use offload_optimizer"
            )
        return self

    # ---- helpers for the optimizer and the engine -------------------------------------------------------

    def resolve_auto(self, hidden_size: int | None = None) -> ZeroConfig:
        """A copy with every ``"auto"`` bucket size filled in.

        With ``hidden_size`` the values follow the Hugging Face integration (``reduce_bucket_size =
        hidden²``, ``stage3_prefetch_bucket_size = 0.9·hidden²``, ``stage3_param_persistence_threshold =
        10·hidden``); without it, DeepSpeed's defaults.
        """
        if hidden_size is not None:
            guessed = {
                "reduce_bucket_size": hidden_size * hidden_size,
                "prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                "param_persistence_threshold": 10 * hidden_size,
            }
        else:
            guessed = AUTO_DEFAULTS
        update = {k: v for k, v in guessed.items() if getattr(self, k) == "auto"}
        return self.model_copy(update=update)

    @property
    def reduce_bucket_elements(self) -> int:
        """``reduce_bucket_size`` as a number (DeepSpeed's default when still ``"auto"``)."""
        v = self.reduce_bucket_size
        return AUTO_DEFAULTS["reduce_bucket_size"] if v == "auto" else int(v)

    def unsupported_features(self, *, model_on_cpu: bool = True) -> list[str]:
        """Configured features that zero-shard does not implement yet (empty when all is built).

        ``offload_optimizer`` (``cpu`` and ``nvme``) is built for stages 1-3 (:mod:`zero_shard.offload`), except
        a partial offload (``ratio`` < 1). At stage 3 ``offload_param.device='cpu'`` is supported when the model
        itself lives on CPU (its parameter partitions are then in CPU memory already).
        """
        out = []
        off = self.offload_optimizer
        if off is not None and off.enabled and off.ratio < 1.0:
            out.append(
                f"zero_optimization.offload_optimizer.ratio={off.ratio} (partial offload; use 1.0: everything offloaded)"
            )
        if off is not None and off.enabled and off.super_offload:
            out.append("zero_optimization.offload_optimizer.super_offload")
        par = self.offload_param
        # A CPU model's stage-3 partitions already live in CPU memory; otherwise the shards move (cpu/nvme),
        # which is built together with optimizer offload (the step writes the offloaded shards directly).
        moves = par is not None and par.enabled and not (par.device == OffloadDevice.cpu and model_on_cpu)
        if moves and not (off is not None and off.enabled):
            out.append(
                f"zero_optimization.offload_param.device={par.device.value!r} without offload_optimizer "
                f"(set zero_optimization.offload_optimizer.device to 'cpu' or 'nvme' as well)"
            )
        if self.zero_hpz_partition_size > 1:
            out.append("zero_optimization.zero_hpz_partition_size>1 (ZeRO++ hpZ)")
        if self.zero_quantized_weights or self.zero_quantized_nontrainable_weights:
            out.append("zero_optimization.zero_quantized_weights (ZeRO++ qwZ)")
        if self.zero_quantized_gradients:
            out.append("zero_optimization.zero_quantized_gradients (ZeRO++ qgZ)")
        if self.mics_shard_size > 0:
            out.append("zero_optimization.mics_shard_size (MiCS)")
        if self.zenflow is not None:
            out.append("zero_optimization.zenflow")
        return out
