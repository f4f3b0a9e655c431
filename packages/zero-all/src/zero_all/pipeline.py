"""Pipeline and model parallelism in ``initialize()``: the data-parallel group, the rules, the glue.

pipe3d runs the schedule (:class:`pipe3d.PipelineEngine`); this module only decides, from the
model and ``mpu``, which process group ZeRO reduces and partitions over (the data axis), checks
what the combination does not support, and connects the pipeline's backwards to zero-shard's
optimizer (``backward(tensor, boundary)``) so ZeRO-1 reduces once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zero_all.config.loader import ConfigError

__all__ = [
    "ParallelLayout",
    "attach_pipeline",
    "is_model_parallel_parameter",
    "load_pipeline_engine",
    "norm_replicated_params",
    "parallel_layout",
    "pipeline_schedule",
    "save_pipeline_engine",
]


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: the data-parallel group ZeRO uses, its size, and the model-parallel degree."""

    data_parallel_group: Any
    data_parallel_world_size: int
    model_parallel_world_size: int  # ranks per replica (pipe x tensor); 1 without model parallelism
    pipeline: bool
    model_parallel_group: Any = None  # the ranks of this replica (pipe x tensor); None without model parallelism
    tensor_parallel_rank: int = 0

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
    mp_group = None
    if int(mp) > 1:
        if not callable(getattr(mpu, "get_model_parallel_group", None)):
            raise TypeError(
                f"mpu reports model_parallel_world_size {mp} but has no get_model_parallel_group(): the gradient "
                "norm and the fp16 overflow check need the group of ranks that hold one model replica"
            )
        mp_group = mpu.get_model_parallel_group()
    layout = ParallelLayout(
        mpu.get_data_parallel_group(),
        int(mpu.get_data_parallel_world_size()),
        int(mp),
        pipeline,
        mp_group,
        _tensor_parallel_rank(mpu),
    )
    stage = int(cfg.zero_optimization.stage)
    if pipeline and stage >= 2:
        raise ConfigError(
            f"ds_config.zero_optimization.stage: {stage} with a PipelineModule is not supported; pipeline "
            "parallelism works with ZeRO stage 0 or 1 (stages 2 and 3 would reduce or gather every "
            "micro-batch, as DeepSpeed also refuses)"
        )
    return layout


def _tensor_parallel_rank(mpu: Any) -> int:
    """The tensor-parallel rank, asked as DeepSpeed does across mpu versions (Megatron's name first)."""
    for name in ("get_tensor_model_parallel_rank", "get_slice_parallel_rank", "get_model_parallel_rank"):
        if callable(getattr(mpu, name, None)):
            return int(getattr(mpu, name)())
    return 0


def is_model_parallel_parameter(p: torch.Tensor) -> bool:
    """Whether ``p`` holds only this rank's tensor-parallel slice (Megatron's / DeepSpeed's attributes)."""
    return bool(getattr(p, "tensor_model_parallel", False) or getattr(p, "model_parallel", False))


def norm_replicated_params(model: torch.nn.Module, layout: ParallelLayout) -> list[torch.Tensor]:
    """Parameters another model-parallel rank holds identically and counts in the gradient norm.

    DeepSpeed's rule (``get_grad_norm_direct``): a tied weight on any pipeline stage but the first that
    uses it (``ds_pipe_replicated``), and, on tensor-parallel ranks > 0, every parameter that is not
    split (a row-parallel bias, layer norms). Empty without model parallelism.
    """
    if layout.model_parallel_group is None:
        return []
    return [
        p
        for p in model.parameters()
        if getattr(p, "ds_pipe_replicated", False)
        or (layout.tensor_parallel_rank > 0 and not is_model_parallel_parameter(p))
    ]


def pipeline_schedule(model: Any, cfg: Any, gradient_accumulation_steps: int) -> str:
    """The schedule ``ds_config.pipeline`` asks for, checked against the module; applies its module keys.

    ``activation_checkpoint_interval > 0`` replaces the module's (DeepSpeed's engine does the same);
    ``stages`` must be "auto" or the module's stage count.
    """
    pcfg = cfg.pipeline
    if pcfg.stages != "auto" and int(pcfg.stages) != model.num_stages:
        raise ConfigError(
            f"ds_config.pipeline.stages: {pcfg.stages}, but the PipelineModule has {model.num_stages} stages "
            "(set by its num_stages/topology); use 'auto' or the module's count"
        )
    if pcfg.activation_checkpoint_interval > 0:
        model.activation_checkpoint_interval = int(pcfg.activation_checkpoint_interval)
    schedule = pcfg.schedule_for(model.num_chunks)
    chunks = model.num_chunks
    if schedule == "interleaved" and chunks == 1:
        raise ConfigError(
            "ds_config.pipeline.schedule: 'interleaved' needs virtual stages: build the PipelineModule with "
            "num_chunks=v (v > 1)"
        )
    if schedule != "interleaved" and chunks > 1:
        raise ConfigError(
            f"ds_config.pipeline.schedule: {schedule!r} runs one model chunk per stage, but the PipelineModule "
            f"has num_chunks={chunks}; use 'interleaved' (or leave schedule unset)"
        )
    if schedule == "interleaved" and gradient_accumulation_steps % model.num_stages:
        raise ConfigError(
            f"ds_config.pipeline.schedule: 'interleaved' needs gradient_accumulation_steps "
            f"({gradient_accumulation_steps}) to be a multiple of the pipeline stages ({model.num_stages})"
        )
    return schedule


def attach_pipeline(
    engine: Any, model: Any, optimizer: Any, gradient_accumulation_steps: int, schedule: str, recv_ahead: int
) -> Any:
    """A :class:`pipe3d.PipelineEngine` running ``schedule`` (from :func:`pipeline_schedule`), its
    backwards through zero-shard's ``optimizer``; ``recv_ahead`` is ``ds_config.pipeline.recv_ahead``."""
    from pipe3d import PipelineEngine

    def backward(tensor: Any, boundary: bool) -> None:
        optimizer.set_gradient_accumulation_boundary(boundary)
        optimizer.backward(tensor)

    return PipelineEngine(
        model, gradient_accumulation_steps, schedule=schedule, backward=backward, recv_ahead=recv_ahead
    )


def save_pipeline_engine(engine: Any, save_dir: Any, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
    """An engine checkpoint of a PipelineModule: per-layer weights, optimizer state per rank, counters."""
    from pipe3d.checkpoint import save_pipeline_checkpoint
    from zero_all.checkpoint.engine_io import _check_json

    meta = {
        "zero_stage": engine.zero_optimization_stage(),
        "engine": {
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "micro_steps": engine.micro_steps,
            "skipped_steps": engine.skipped_steps,
        },
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "client_state": _check_json(client_state),
        "ds_config": engine.config.raw,
    }
    save_pipeline_checkpoint(
        engine.module,
        save_dir,
        tag,
        optimizer_state=engine.optimizer.sharded_state(),
        meta=meta,
        save_latest=save_latest,
    )


def load_pipeline_engine(
    engine: Any,
    load_dir: Any,
    tag: str | None,
    *,
    strict: bool,
    load_optimizer_states: bool,
    load_lr_scheduler_states: bool,
) -> tuple[str | None, dict[str, Any] | None]:
    """Load a :func:`save_pipeline_engine` checkpoint, at the same or another pipeline / data split."""
    import warnings

    from pipe3d.checkpoint import load_optimizer_shard_sets, load_pipeline_checkpoint, read_latest
    from zero_all.checkpoint.files import CheckpointError
    from zero_shard.checkpoint_state import merge_shard_sets

    if tag is None and read_latest(load_dir) is None:
        return None, None
    manifest, shards = load_pipeline_checkpoint(engine.module, load_dir, tag, strict=strict)
    meta = manifest["meta"]
    if shards is None and load_optimizer_states:
        # Another layer -> stage split: each parameter's master and moments come, by name, from the
        # saved stage that held it (re-sharded over this stage's data-parallel group).
        sets = load_optimizer_shard_sets(engine.module, load_dir, tag)
        if sets is not None:
            shards = merge_shard_sets(engine.optimizer, sets)
    if shards is not None and load_optimizer_states:
        engine.optimizer.load_sharded_state(shards)
    else:
        if engine.optimizer.compute_dtype != torch.float32:
            raise CheckpointError(
                "this pipeline checkpoint is loaded without its optimizer state: only the weights can be "
                "loaded, and that needs an fp32 model (the 16-bit model's fp32 master would not follow)"
            )
        if load_optimizer_states:
            warnings.warn(
                "pipeline checkpoint without optimizer state files: weights loaded, the optimizer state "
                "(moments, step counts) was not",
                UserWarning,
                stacklevel=3,
            )
        engine.optimizer.zero_grad()
    if load_lr_scheduler_states and engine.lr_scheduler is not None and meta.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if load_optimizer_states:
        for key, value in meta["engine"].items():
            setattr(engine, key, int(value))
    tag = tag if tag is not None else read_latest(load_dir)
    return str(Path(load_dir) / str(tag)), meta.get("client_state", {})
