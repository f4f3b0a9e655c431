"""The training engine: DeepSpeed's ``DeepSpeedEngine`` interface, composed from the packages.

The engine owns the training-loop bookkeeping (micro steps, accumulation boundaries, global
steps, the learning-rate schedule, printing and monitoring) and delegates the numbers:
zero-shard's ``ZeroShardedOptimizer`` does backward scaling, gradient reduction, unscale +
clip, the optimizer step and parameter all-gather for ZeRO stages 0-2; checkpoint files are
written by ``zero_all.checkpoint``. (DeepSpeed's engine is 5,863 lines; this one composes.)
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from zero_all.checkpoint.engine_io import load_engine_checkpoint, save_engine_checkpoint
from zero_all.config.batch import BatchSizes
from zero_all.config.model import ZeroAllConfig
from zero_all.monitoring import EngineMonitor

__all__ = ["Engine"]


class Engine(torch.nn.Module):
    """Wraps ``module`` for training with a ds_config; returned by :func:`zero_all.initialize`.

    Use it as DeepSpeed's engine::

        loss = engine(batch)          # forward
        engine.backward(loss)         # scaled, accumulated backward
        engine.step()                 # optimizer + scheduler at accumulation boundaries
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: Any,
        lr_scheduler: Any,
        config: ZeroAllConfig,
        batch: BatchSizes,
        *,
        device: torch.device,
        process_group: Any = None,
        training_dataloader: Any = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.config = config
        self.batch = batch
        self.device = device
        self.process_group = process_group
        self.training_dataloader = training_dataloader
        self.global_rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._step_skipped = False
        # Set by set_gradient_accumulation_boundary(): a caller (the Hugging Face Trainer) that decides the
        # boundaries itself, e.g. a shorter last accumulation at the end of an epoch. None: micro-step count.
        self._boundary_override: bool | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self.monitor = EngineMonitor(config, batch, self.global_rank, self.world_size)
        # A pipe3d.PipelineEngine when the model is a PipelineModule (set by initialize()).
        self.pipeline: Any = None
        # Ranks per model replica (mpu's pipe x tensor); set by initialize().
        self.model_parallel_world_size = 1

    # ----------------------------------------------------------------- properties DeepSpeed has
    def train_batch_size(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        """Samples per forward on one rank."""
        return self.batch.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        """Micro steps per optimizer step."""
        return self.batch.gradient_accumulation_steps

    def zero_optimization_stage(self) -> int:
        """The ZeRO stage in use."""
        return int(self.config.zero_optimization.stage)

    def gradient_clipping(self) -> float:
        """The clipping norm (0 = off)."""
        return float(self.config.gradient_clipping)

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 unless fp16)."""
        return float(self.optimizer.loss_scale)

    def get_lr(self) -> list[float]:
        """The learning rate of every param group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The global gradient norm of the last optimizer step (before clipping)."""
        norm = getattr(self.optimizer, "global_grad_norm", None)
        return None if norm is None else float(norm)

    def was_step_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (fp16 overflow)."""
        return self._step_skipped

    def is_gradient_accumulation_boundary(self) -> bool:
        """True on the micro step whose ``step()`` will run the optimizer."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.batch.gradient_accumulation_steps == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """Say whether the current micro step ends an accumulation (DeepSpeed's override; ``None``: count micro steps).

        For a loop that decides the boundaries itself, as the Hugging Face Trainer does when an epoch's last
        accumulation is shorter than ``gradient_accumulation_steps``. Set it before ``backward()``: the
        gradient reduction of that backward already depends on it.
        """
        self._boundary_override = None if is_boundary is None else bool(is_boundary)

    # ----------------------------------------------------------------- the loop
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module."""
        self.monitor.timers_start("forward")
        out = self.module(*args, **kwargs)
        self.monitor.timers_stop("forward")
        return out

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backward of ``loss / gradient_accumulation_steps`` (loss-scaled, reduced by zero-shard).

        ``scale_wrt_gas=False`` (DeepSpeed's flag) skips the division, for a caller whose loss is already
        normalised over the accumulated batch (the Hugging Face Trainer's).
        """
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError("engine.backward(loss) needs a scalar loss tensor")
        self.monitor.timers_start("backward")
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_count += 1
        gas = self.batch.gradient_accumulation_steps
        scaled = loss / gas if gas > 1 and scale_wrt_gas else loss
        self.optimizer.set_gradient_accumulation_boundary(self.is_gradient_accumulation_boundary())
        if retain_graph:
            self.optimizer.backward(scaled, retain_graph=True)
        else:
            self.optimizer.backward(scaled)
        self.monitor.timers_stop("backward")
        return loss

    def step(self) -> None:
        """At an accumulation boundary: clip, optimizer step, scheduler step, zero grads. Always: count the micro step."""
        if self.is_gradient_accumulation_boundary():
            self.monitor.timers_start("step")
            ok = bool(self.optimizer.step())
            self._step_skipped = not ok
            if ok:
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
            else:
                self.skipped_steps += 1
            self.optimizer.zero_grad()
            self.global_steps += 1
            self.global_samples += self.batch.train_batch_size
            self.monitor.timers_stop("step")
            self._report()
        self.micro_steps += 1

    def _report(self) -> None:
        loss = None
        # .item() waits for the device: only when the loss is printed or monitored this step.
        if self._loss_sum is not None and self.monitor.wants_loss(self.global_steps):
            loss = float(self._loss_sum.item() / self._loss_count)
        self._loss_sum, self._loss_count = None, 0
        self.monitor.after_step(
            step=self.global_steps,
            samples=self.global_samples,
            loss=loss,
            lr=self.get_lr(),
            loss_scale=self.loss_scale,
            grad_norm=self.get_global_grad_norm(),
            skipped=self.skipped_steps,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop accumulated gradients (the engine does this itself after each optimizer step)."""
        self.optimizer.zero_grad()

    # ----------------------------------------------------------------- pipelines
    def _pipeline_engine(self, what: str) -> Any:
        if self.pipeline is None:
            raise RuntimeError(f"engine.{what}() needs a pipe3d.PipelineModule model; use forward/backward/step")
        return self.pipeline

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        """One optimizer step of a PipelineModule over gradient_accumulation_steps micro-batches; the mean loss.

        ``data_iter`` yields ``(inputs, labels)`` micro-batches (the first and last stages read it;
        None: the engine's training dataloader). ZeRO-1 reduces over the data axis once per batch.
        """
        pipe = self._pipeline_engine("train_batch")
        if data_iter is None:
            data_iter = self._data_iterator()
        self.monitor.timers_start("forward")
        loss = pipe.forward_backward(data_iter)
        self.monitor.timers_stop("forward")
        self._loss_sum, self._loss_count = loss.detach().float(), 1
        # The pipeline ran all micro steps; step() counts the last one and steps at the boundary.
        self.micro_steps += self.batch.gradient_accumulation_steps - 1
        self.step()
        return loss

    def eval_batch(self, data_iter: Any, return_logits: bool = False, bcast_loss: bool = True) -> Any:
        """Forward of gradient_accumulation_steps micro-batches of a PipelineModule; the mean loss."""
        return self._pipeline_engine("eval_batch").eval_batch(
            data_iter, return_logits=return_logits, bcast_loss=bcast_loss
        )

    def _data_iterator(self) -> Any:
        if self.training_dataloader is None:
            raise RuntimeError("engine.train_batch() without data_iter needs training_data= in initialize()")
        if getattr(self, "_train_iter", None) is None:
            self._train_iter = iter(self.training_dataloader)
        return self._train_iter

    def is_first_stage(self) -> bool:
        """Whether this rank holds the first pipeline stage (True without a pipeline)."""
        return self.pipeline is None or self.pipeline.is_first_stage()

    def is_last_stage(self) -> bool:
        """Whether this rank holds the last pipeline stage (True without a pipeline)."""
        return self.pipeline is None or self.pipeline.is_last_stage()

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self,
        save_dir: str | os.PathLike[str],
        tag: str | None = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
    ) -> bool:
        """Write a pickle-free checkpoint to ``save_dir/tag`` (tag defaults to ``global_step<N>``)."""
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        if self.pipeline is not None:
            from zero_all.pipeline import save_pipeline_engine

            save_pipeline_engine(self, save_dir, tag, client_state or {}, save_latest)
            return True
        self._refuse_model_parallel_checkpoint()
        save_engine_checkpoint(self, save_dir, tag, client_state or {}, save_latest=save_latest)
        return True

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike[str],
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Load a checkpoint (any world size, any stage 0-2); returns ``(path, client_state)`` or ``(None, None)``."""
        if self.pipeline is not None:
            from zero_all.pipeline import load_pipeline_engine

            return load_pipeline_engine(
                self,
                load_dir,
                tag,
                strict=load_module_strict,
                load_optimizer_states=load_optimizer_states and not load_module_only,
                load_lr_scheduler_states=load_lr_scheduler_states and not load_module_only,
            )
        self._refuse_model_parallel_checkpoint()
        return load_engine_checkpoint(
            self,
            load_dir,
            tag,
            load_module_strict=load_module_strict,
            load_optimizer_states=load_optimizer_states and not load_module_only,
            load_lr_scheduler_states=load_lr_scheduler_states and not load_module_only,
        )

    def _refuse_model_parallel_checkpoint(self) -> None:
        """Engine checkpoints name files by data-parallel rank: tensor-parallel ranks of one replica would collide."""
        if self.model_parallel_world_size > 1:
            from zero_all.checkpoint.files import CheckpointError

            raise CheckpointError(
                f"save_checkpoint/load_checkpoint with mpu= model parallelism ({self.model_parallel_world_size} ranks "
                "per replica, e.g. tensor-parallel) and a plain model are not supported yet: the per-rank files of "
                "the tensor-parallel ranks would overwrite each other. Build the model as a pipe3d.PipelineModule "
                "(its checkpoints are per stage and tensor-parallel rank), or save each rank's state_dict yourself"
            )

    def empty_partition_cache(self) -> None:
        """Stage 3: free every gathered (non-persistent) parameter now, e.g. before evaluation. No-op below stage 3."""
        release = getattr(self.optimizer, "empty_partition_cache", None)
        if release is not None:
            release()

    def consolidated_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
        """The whole model's state_dict on rank 0 (None on the other ranks); every rank must call it.

        Stage 3 gathers one unit at a time, so no rank ever holds more than the result plus one module.
        Parameters come in the training (16-bit) dtype unless ``dtype`` is given; tied weights appear under
        each of their names.
        """
        from zero_all.checkpoint.model_export import consolidated_state_dict

        return consolidated_state_dict(self, dtype)

    def _zero3_consolidated_16bit_state_dict(self) -> dict[str, torch.Tensor] | None:
        """DeepSpeed's name for :meth:`consolidated_state_dict` in the training dtype (used by HF exporters)."""
        return self.consolidated_state_dict()

    def save_16bit_model(self, save_dir: str | os.PathLike[str], save_filename: str = "model.safetensors") -> bool:
        """Write the whole model in its training dtype to ``save_dir/save_filename`` (safetensors), rank 0.

        At stage 3 this needs ``zero_optimization.stage3_gather_16bit_weights_on_model_save: true`` (as in
        DeepSpeed, which otherwise saves nothing and returns False). Every rank must call it. A name ending in
        ``.bin`` or ``.pt`` is written as safetensors under the name given (zero-all never pickles).
        """
        from zero_all.checkpoint.model_export import save_16bit_model

        return save_16bit_model(self, save_dir, save_filename)

    def destroy(self) -> None:
        """Close monitors."""
        self.monitor.close()
