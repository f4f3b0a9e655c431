"""``ZeroAllTrainer`` / ``ZeroAllSeq2SeqTrainer``: the Hugging Face Trainer, trained by zero-all's engine.

Why a subclass (docs/trainer.md has the long form): transformers reaches DeepSpeed through
accelerate's ``DistributedType.DEEPSPEED``, which imports ``deepspeed`` and builds its engine in
``Accelerator.prepare``; taking that road would mean impersonating the ``deepspeed`` package or
patching accelerate. Instead the Trainer keeps its ordinary (DDP-capable) accelerator for the
data loaders, logging and callbacks, and this mixin replaces the five things the engine owns,
each through a method the Trainer documents for overriding or has kept through its releases:

* ``create_optimizer`` - the Trainer's optimizer (its decay / no-decay groups), or none when the
  ds_config has an ``optimizer`` section;
* ``_wrap_model`` - builds the engine with ``zero_all.initialize`` (instead of DDP), once;
* ``create_scheduler`` - the Trainer's schedule over the engine's optimizer, or the ds_config's;
  the engine steps it (and skips it when an fp16 step overflowed), as DeepSpeed does;
* ``training_step`` - ``engine.backward`` + ``engine.step`` with the Trainer's own loss
  normalisation and its accumulation boundaries;
* checkpoint and export methods - a zero-all checkpoint inside each ``checkpoint-N`` folder,
  loaded by ``resume_from_checkpoint``; ``save_model`` consolidates stage-3 partitions.

The optimizer and scheduler the Trainer sees are proxies whose ``step()`` does nothing (the
engine has stepped already); everything else (``param_groups``, ``get_last_lr``, state) is the
engine's.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer

from zero_all.config.loader import ConfigError
from zero_all.integrations.transformers.config import HfZeroAllConfig

__all__ = ["ZeroAllSeq2SeqTrainer", "ZeroAllTrainer", "ZeroAllTrainerMixin"]


class _SteppedByEngine:
    """The engine's optimizer or scheduler as the Trainer's loop sees it: ``step()`` is a no-op.

    The engine steps both inside ``training_step`` at each accumulation boundary; the Trainer's own
    ``optimizer.step()`` / ``lr_scheduler.step()`` calls that follow must not step them again. Not a
    ``torch.optim.Optimizer`` on purpose: accelerate passes such an object through ``prepare``
    unchanged instead of wrapping it (its wrapper would step and zero gradients itself).
    """

    def __init__(self, inner: Any, last_lr: Any) -> None:
        self.inner = inner
        self._last_lr = last_lr  # () -> the lrs of the engine's last optimizer step

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the engine has stepped."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the engine clears gradients after its step."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The engine optimizer's param groups."""
        return self.inner.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The inner object's state (checkpoints go through the engine; see ZeroAllTrainer)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load into the inner object."""
        self.inner.load_state_dict(state)

    def get_last_lr(self) -> list[float]:
        """The learning rates the engine's last optimizer step used (what the Trainer logs for that step)."""
        return list(self._last_lr())

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy / unpickling): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)


def _trainer_args_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("args", args[1] if len(args) > 1 else None)


class ZeroAllTrainerMixin:
    """The zero-all half of ``ZeroAllTrainer``; mix it in front of any ``transformers.Trainer`` subclass.

    The ds_config comes from ``zero_all_config=`` (path, dict or :class:`HfZeroAllConfig`), else from
    ``args.zero_all_config`` / ``--deepspeed`` of zero-all's ``TrainingArguments``.
    """

    def __init__(self, *args: Any, zero_all_config: Any = None, **kwargs: Any) -> None:
        targs = _trainer_args_of(args, kwargs)
        source = zero_all_config if zero_all_config is not None else getattr(targs, "zero_all_config", None)
        if targs is not None and getattr(targs, "deepspeed", None):
            raise ConfigError(
                "TrainingArguments.deepspeed is set on a transformers.TrainingArguments, so transformers has set up "
                "DeepSpeed itself. With zero-all use zero_all.integrations.transformers.TrainingArguments (its "
                "--deepspeed goes to zero-all) or pass the config as ZeroAllTrainer(zero_all_config=...)"
            )
        if source is None:
            raise ConfigError(
                f"{type(self).__name__} needs a ds_config: zero_all_config=PATH_OR_DICT, or --deepspeed PATH with "
                "zero_all.integrations.transformers.TrainingArguments"
            )
        super().__init__(*args, **kwargs)
        self.hf_zero_all_config = HfZeroAllConfig(source)
        self.hf_zero_all_config.trainer_config_process(self.args)
        self.engine: Any = None
        self._zero_all_step_lr: list[float] | None = None
        self.zero_all_resolved_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ building the engine
    def create_optimizer(self, model: Any = None) -> Any:
        """The Trainer's optimizer, unless the ds_config has an ``optimizer`` section (then the engine builds it)."""
        if self.engine is not None:
            return self.optimizer
        if self.hf_zero_all_config.get_value("optimizer") is not None:
            return None
        return super().create_optimizer(model)

    def _wrap_model(self, model: Any, training: bool = True, dataloader: Any = None) -> Any:
        """The zero-all engine in place of DDP: built at the first training call, then reused (also for eval)."""
        if self.engine is not None:
            return self.engine
        if not training:
            if any(hasattr(p, "ds_shape") for p in model.parameters()):
                raise RuntimeError(
                    "evaluate()/predict() before train() on a model built partitioned (from_pretrained_zero3 or "
                    "zero_all.zero.Init): the engine that gathers its parameters is built by train(); train first, "
                    "or evaluate a model built whole"
                )
            return model  # evaluation before training: the plain model, as the Trainer would use it
        self.engine = self._build_engine()
        return self.engine

    def _build_engine(self) -> Any:
        import zero_all

        if self.optimizer is None and self.hf_zero_all_config.get_value("optimizer") is None:
            raise ConfigError("no optimizer: the ds_config has no 'optimizer' section and the Trainer made none")
        resolved = self.hf_zero_all_config.trainer_config_finalize(self.args, self.model, self.state.max_steps)
        if self.hf_zero_all_config.get_value("scheduler") is not None and self.lr_scheduler is not None:
            raise ConfigError(
                "the ds_config has a 'scheduler' section and a scheduler was passed to the Trainer (optimizers=); "
                "keep one of them"
            )
        self.zero_all_resolved_config = resolved
        client_optimizer = None if resolved.get("optimizer") is not None else self.optimizer
        engine, optimizer, _, scheduler = zero_all.initialize(
            model=self.model,
            optimizer=client_optimizer,
            lr_scheduler=self.lr_scheduler,  # one passed in optimizers=(opt, sched); else None
            config=resolved,
        )
        self._zero_all_optimizer = optimizer
        self.optimizer = _SteppedByEngine(optimizer, self._step_lr)
        if scheduler is not None:
            self.lr_scheduler = _SteppedByEngine(scheduler, self._step_lr)
        return engine

    def _step_lr(self) -> list[float]:
        # The lrs the last optimizer step used (the engine steps the schedule right after it, so
        # get_lr() would already be the next step's); before the first step, the current ones.
        return self._zero_all_step_lr if self._zero_all_step_lr is not None else self.engine.get_lr()

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The Trainer's schedule over the engine's optimizer (unless the engine has one); the engine steps it."""
        if self.engine is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        # The Trainer's schedule needs a real torch optimizer: the engine's (same param groups).
        scheduler = super().create_scheduler(num_training_steps, self._zero_all_optimizer)
        self.engine.lr_scheduler = scheduler
        self.lr_scheduler = _SteppedByEngine(scheduler, self._step_lr)
        return self.lr_scheduler

    # ------------------------------------------------------------------ one micro step
    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward, ``engine.backward`` and ``engine.step``, with the Trainer's loss normalisation and boundaries."""
        if self.engine is None:
            return super().training_step(model, inputs, num_items_in_batch)
        engine = self.engine
        engine.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(engine, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        # The Trainer's rule: a loss normalised by num_items_in_batch (or by a custom loss function) is
        # already a share of the accumulated batch; a per-batch mean is divided by this step's length.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or getattr(
                self, "compute_loss_func", None
            ) is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        # The Trainer decides the boundary (the last accumulation of an epoch can be shorter).
        boundary = bool(self.accelerator.sync_gradients)
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(loss, scale_wrt_gas=False)
        if boundary:
            self._zero_all_step_lr = engine.get_lr()
        engine.step()
        return loss.detach()

    def _clip_grad_norm(self, model: Any) -> Any:
        """The engine clipped inside its step (ds_config gradient_clipping = max_grad_norm): its pre-clip norm."""
        if self.engine is None:
            return super()._clip_grad_norm(model)
        return self.engine.get_global_grad_norm()

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """The engine's global gradient norm of the last step (gradients live in ZeRO partitions, not p.grad)."""
        if self.engine is None:
            return super()._get_grad_norm(model, grad_norm)
        return self.engine.get_global_grad_norm() if grad_norm is None else grad_norm

    # ------------------------------------------------------------------ checkpoints and export
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """A zero-all checkpoint (model, fp32 master, optimizer and scheduler state) in the checkpoint folder."""
        if self.engine is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        self.engine.save_checkpoint(output_dir)
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """``resume_from_checkpoint``: the engine loads its checkpoint (weights, master, optimizer, scheduler)."""
        if self.engine is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        path, _ = self.engine.load_checkpoint(checkpoint)
        if path is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint={checkpoint!r}: no zero-all checkpoint there (no 'latest' file); it was "
                "not written by ZeroAllTrainer"
            )
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Model weights come from the engine checkpoint; the HF-format file is read only below stage 3."""
        if self.hf_zero_all_config.is_zero3():
            return None  # stage 3's save_model files may be absent; the engine checkpoint has everything
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Hugging Face-format model (``from_pretrained`` loads it); stage-3 partitions are gathered first."""
        if self.engine is None or self.engine.zero_optimization_stage() != 3:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = self.engine.consolidated_state_dict()  # every rank joins; rank 0 gets it
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        return None

    def _get_learning_rate(self) -> float:
        """The learning rate the last optimizer step used (logged as the Trainer logs it)."""
        if self.engine is None:
            return super()._get_learning_rate()
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.engine.get_lr()[0]
        return float(lr.item() if torch.is_tensor(lr) else lr)


class ZeroAllTrainer(ZeroAllTrainerMixin, Trainer):
    """``transformers.Trainer`` trained by zero-all: same arguments plus ``zero_all_config=`` (a ds_config)."""


class ZeroAllSeq2SeqTrainer(ZeroAllTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` trained by zero-all: same arguments plus ``zero_all_config=`` (a ds_config)."""
