"""Pipeline and model parallelism in ``initialize()``: the data-parallel group, the rules, the glue.

pipe3d runs the schedule (:class:`pipe3d.PipelineEngine`); this module only decides, from the
model and ``mpu``, which process group ZeRO reduces and partitions over (the data axis), checks
what the combination does not support, and connects the pipeline's backwards to zero-shard's
optimizer (``backward(tensor, boundary)``) so ZeRO-1 reduces once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from zero_all.config.loader import ConfigError

__all__ = ["ParallelLayout", "attach_pipeline", "parallel_layout"]


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: the data-parallel group ZeRO uses, its size, and the model-parallel degree."""

    data_parallel_group: Any
    data_parallel_world_size: int
    model_parallel_world_size: int  # ranks per replica (pipe x tensor); 1 without model parallelism
    pipeline: bool

    def data_parallel_rank_and_size(self) -> tuple[int, int] | None:
        """``(replicas, this replica's index)`` for the data sampler; None without a data-parallel group."""
        if self.data_parallel_group is None:
            return None
        return self.data_parallel_world_size, dist.get_rank(self.data_parallel_group)


def parallel_layout(model: Any, mpu: Any, cfg: Any) -> ParallelLayout:
    """The layout for ``model`` (a PipelineModule or not) and ``mpu`` (any object with get_data_parallel_*)."""
    from pipe3d import PipelineModule

    pipeline = isinstance(model, PipelineModule)
    if pipeline and mpu is None:
        mpu = model.mpu()
    if mpu is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return ParallelLayout(None, world, 1, pipeline)
    for name in ("get_data_parallel_group", "get_data_parallel_world_size"):
        if not callable(getattr(mpu, name, None)):
            raise TypeError(f"mpu must have {name}() (a Megatron/DeepSpeed-style mpu), got {type(mpu).__name__}")
    mp = mpu.get_model_parallel_world_size() if callable(getattr(mpu, "get_model_parallel_world_size", None)) else 1
    layout = ParallelLayout(mpu.get_data_parallel_group(), int(mpu.get_data_parallel_world_size()), int(mp), pipeline)
    stage = int(cfg.zero_optimization.stage)
    if pipeline and stage >= 2:
        raise ConfigError(
            f"ds_config.zero_optimization.stage: {stage} with a PipelineModule is not supported; pipeline "
            "parallelism works with ZeRO stage 0 or 1 (stages 2 and 3 would reduce or gather every "
            "micro-batch, as DeepSpeed also refuses)"
        )
    if layout.model_parallel_world_size > 1:
        # zero-shard computes the gradient norm and the fp16 overflow flag over the data group only;
        # with several stages (or tensor-parallel shards) a replica's gradients are spread over more ranks.
        if float(cfg.gradient_clipping) > 0:
            raise ConfigError(
                "ds_config.gradient_clipping > 0 with pipeline/model parallelism is not supported yet: the global "
                "norm would be computed per stage; set gradient_clipping to 0"
            )
        if cfg.fp16.enabled is True:
            raise ConfigError(
                "ds_config.fp16 with pipeline/model parallelism is not supported yet (overflow is not agreed across "
                "stages); use bf16 or fp32"
            )
    return layout


def attach_pipeline(engine: Any, model: Any, optimizer: Any, gradient_accumulation_steps: int) -> Any:
    """A :class:`pipe3d.PipelineEngine` whose backwards go through zero-shard's ``optimizer``."""
    from pipe3d import PipelineEngine

    def backward(tensor: Any, boundary: bool) -> None:
        optimizer.set_gradient_accumulation_boundary(boundary)
        optimizer.backward(tensor)

    schedule = "interleaved" if model.num_chunks > 1 else "1f1b"
    return PipelineEngine(model, gradient_accumulation_steps, schedule=schedule, backward=backward)
