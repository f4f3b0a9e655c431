"""Static and dynamic loss scalers with DeepSpeed's update rules, agreed across ranks.

The rules of :meth:`DynamicLossScaler.update_scale` are DeepSpeed's
(``deepspeed/runtime/fp16/loss_scaler.py``), step for step:

* On an overflow: if hysteresis is exhausted (``hysteresis == 1`` or ``cur_hysteresis == 1``)
  the scale is halved, never below ``min_scale``; when it is already at ``min_scale`` and
  ``raise_error_at_min_scale`` is set, :class:`LossScaleUnderflowError` is raised instead.
  Otherwise ``cur_hysteresis`` drops by one and the scale stays. Either way the overflow's
  iteration is remembered.
* On a clean step: with ``consecutive_hysteresis`` the hysteresis is refilled. The number of
  clean steps *before* this one since the last overflow is ``cur_iter - last_overflow_iter - 1``;
  when it is a positive multiple of ``scale_window`` the scale doubles (and, without
  ``consecutive_hysteresis``, the hysteresis is refilled then). So the scale first doubles on
  the ``scale_window + 1``-th clean step, then every ``scale_window`` clean steps.
* Every call advances ``cur_iter``.

Overflow detection (:meth:`has_overflow`) all-reduces a flag over the process group (MAX), so
every rank sees the same answer and skips the same step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from amp_scaler._dist import ProcessGroup, all_reduce_max_flag

if TYPE_CHECKING:
    from amp_scaler.config import FP16Config

__all__ = ["DynamicLossScaler", "LossScaleUnderflowError", "LossScalerBase", "StaticLossScaler", "create_loss_scaler"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


class LossScaleUnderflowError(RuntimeError):
    """Gradients overflowed with the loss scale already at ``min_scale``: training cannot go on safely."""


class LossScalerBase:
    """What both scalers share: the current scale, loss scaling, overflow checks and skip counting."""

    dynamic: bool = False

    def __init__(self, scale: float, process_group: ProcessGroup = None) -> None:
        self.cur_scale = float(scale)
        self.process_group = process_group
        self.skipped_steps = 0
        """Steps reported as overflowed through :meth:`update_scale` (the optimizer skipped them)."""

    @property
    def loss_scale(self) -> float:
        """The scale the next loss is multiplied by."""
        return self.cur_scale

    @property
    def inv_scale(self) -> float:
        """``1 / loss_scale``: what gradients are multiplied by to unscale them."""
        return 1.0 / self.cur_scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale`` (not in place; call ``.backward()`` on the result)."""
        return loss * self.cur_scale

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Back-propagate the scaled loss."""
        self.scale_loss(loss).backward(retain_graph=retain_graph)

    def has_overflow(self, tensors: Iterable[torch.Tensor | None]) -> bool:
        """True when any tensor holds an inf or nan on ANY rank of the process group.

        ``None`` entries (parameters without gradients) are ignored. The check is one
        read-only pass (max-abs per tensor, which propagates inf and nan) and one all-reduce
        of a single flag, so every rank returns the same value.
        """
        return has_inf_or_nan(tensors, self.process_group)

    def update_scale(self, overflow: bool) -> None:
        """Record one step's outcome; a static scale only counts the skipped steps."""
        if overflow:
            self.skipped_steps += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (plain numbers), for pickle-free checkpoints."""
        return {
            "version": _STATE_VERSION,
            "type": "static",
            "cur_scale": self.cur_scale,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        _check_state(state, self)
        # A static scale comes from the config; a dynamic run's last scale does not replace it.
        if state["type"] == "static":
            self.cur_scale = float(state["cur_scale"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(loss_scale={self.cur_scale:g}, skipped_steps={self.skipped_steps})"


class StaticLossScaler(LossScalerBase):
    """A fixed loss scale (``fp16.loss_scale > 0``; 1.0 when fp16 is off).

    :meth:`has_overflow` still checks for inf/nan, so a caller can skip a garbage step as
    DeepSpeed's ZeRO optimizers do; :meth:`update_scale` never changes the scale.
    """

    dynamic = False

    def __init__(self, scale: float = 1.0, process_group: ProcessGroup = None) -> None:
        if isinstance(scale, bool) or not scale > 0 or scale == float("inf"):
            raise ValueError(f"StaticLossScaler: scale must be a finite number > 0, got {scale!r}")
        super().__init__(scale, process_group)

    @classmethod
    def from_config(cls, config: FP16Config, process_group: ProcessGroup = None) -> StaticLossScaler:
        """A static scaler at ``config.loss_scale`` (which must be > 0)."""
        if config.loss_scale <= 0:
            raise ValueError("fp16.loss_scale must be > 0 for a static loss scale (0 means dynamic)")
        return cls(config.loss_scale, process_group=process_group)


class DynamicLossScaler(LossScalerBase):
    """DeepSpeed's dynamic loss scaler (see the module docstring for the exact rules).

    Args:
        init_scale: first scale (DeepSpeed: ``2**fp16.initial_scale_power``).
        scale_window: ``fp16.loss_scale_window``.
        hysteresis: ``fp16.hysteresis`` (DeepSpeed's ``delayed_shift``).
        consecutive_hysteresis: ``fp16.consecutive_hysteresis``.
        min_scale: ``fp16.min_loss_scale``.
        raise_error_at_min_scale: raise :class:`LossScaleUnderflowError` on an overflow at
            ``min_scale`` (DeepSpeed's default); if False the scale stays at ``min_scale``.
        process_group: group over which :meth:`has_overflow` agrees (None: the default group
            when torch.distributed is initialized, else this process alone).
    """

    dynamic = True

    def __init__(
        self,
        init_scale: float = 2.0**16,
        scale_window: int = 1000,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        min_scale: float = 1.0,
        raise_error_at_min_scale: bool = True,
        process_group: ProcessGroup = None,
    ) -> None:
        _positive("init_scale", init_scale)
        _positive("min_scale", min_scale)
        for name, v in (("scale_window", scale_window), ("hysteresis", hysteresis)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DynamicLossScaler: {name} must be an integer >= 1, got {v!r}")
        super().__init__(init_scale, process_group)
        self.scale_factor = 2.0
        self.scale_window = scale_window
        self.min_scale = float(min_scale)
        self.delayed_shift = hysteresis
        self.cur_hysteresis = hysteresis
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_error_at_min_scale = bool(raise_error_at_min_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1

    @classmethod
    def from_config(cls, config: FP16Config, process_group: ProcessGroup = None) -> DynamicLossScaler:
        """The dynamic scaler an ``"fp16"`` section with ``loss_scale: 0`` describes."""
        return cls(**config.dynamic_loss_scale_args(), process_group=process_group)

    def update_scale(self, overflow: bool) -> None:
        """Apply DeepSpeed's rules for one step (see the module docstring)."""
        if overflow:
            self.skipped_steps += 1
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise LossScaleUnderflowError(
                        f"gradients overflowed (inf/nan) with the loss scale already at its minimum "
                        f"{self.min_scale:g} (fp16.min_loss_scale), after {self.skipped_steps} skipped steps; "
                        "cannot decrease the scale further. Lower fp16.min_loss_scale, lower the learning rate, "
                        "or train in bf16/fp32."
                    )
                new_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                logger.info("overflow: skipping step, loss scale %g -> %g", self.cur_scale, new_scale)
                self.cur_scale = new_scale
            else:
                logger.info(
                    "overflow: skipping step, loss scale stays %g, hysteresis %d -> %d",
                    self.cur_scale,
                    self.cur_hysteresis,
                    self.cur_hysteresis - 1,
                )
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            # Clean steps before this one since the last overflow (DeepSpeed counts it this way,
            # so the first growth comes on the (scale_window + 1)-th clean step).
            stable_interval = self.cur_iter - self.last_overflow_iter - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the evolving counters and the settings they were produced with."""
        return {
            "version": _STATE_VERSION,
            "type": "dynamic",
            "cur_scale": self.cur_scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
            "skipped_steps": self.skipped_steps,
            "scale_window": self.scale_window,
            "min_scale": self.min_scale,
            "hysteresis": self.delayed_shift,
            "consecutive_hysteresis": self.consecutive_hysteresis,
            "raise_error_at_min_scale": self.raise_error_at_min_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the evolving state (scale, iteration, last overflow, hysteresis, skips).

        The settings (window, minimum, hysteresis size) stay as this scaler was configured, so
        a resumed run follows the current config; with the same config it continues exactly
        where the saved run stopped.
        """
        _check_state(state, self)
        self.cur_scale = float(state["cur_scale"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state["type"] == "dynamic":
            self.cur_iter = int(state["cur_iter"])
            self.last_overflow_iter = int(state["last_overflow_iter"])
            self.cur_hysteresis = min(int(state["cur_hysteresis"]), self.delayed_shift)

    def __repr__(self) -> str:
        return (
            f"DynamicLossScaler(loss_scale={self.cur_scale:g}, cur_iter={self.cur_iter}, "
            f"cur_hysteresis={self.cur_hysteresis}, skipped_steps={self.skipped_steps})"
        )


def create_loss_scaler(fp16_config: FP16Config | None, process_group: ProcessGroup = None) -> LossScalerBase:
    """The scaler an ``"fp16"`` section asks for.

    ``None`` or ``enabled`` false: ``StaticLossScaler(1.0)`` (bf16/fp32 need no scaling);
    ``loss_scale`` 0: :class:`DynamicLossScaler`; otherwise ``StaticLossScaler(loss_scale)``.
    ``enabled: "auto"`` must be resolved by the caller first.
    """
    if fp16_config is None or fp16_config.enabled is False:
        return StaticLossScaler(1.0, process_group=process_group)
    if fp16_config.enabled == "auto":
        raise ValueError('fp16.enabled is "auto": resolve it to true or false before creating a loss scaler')
    if fp16_config.dynamic_loss_scale:
        return DynamicLossScaler.from_config(fp16_config, process_group=process_group)
    return StaticLossScaler.from_config(fp16_config, process_group=process_group)


def has_inf_or_nan(tensors: Iterable[torch.Tensor | None], process_group: ProcessGroup = None) -> bool:
    """True when any tensor holds inf/nan on any rank of ``process_group`` (all ranks agree).

    One read-only pass per (device, dtype) group: ``torch._foreach_norm(ord=inf)`` is the
    max-abs of each tensor, which is inf or nan exactly when the tensor holds one.
    """
    flag = _local_nonfinite(tensors)
    return all_reduce_max_flag(flag, process_group)


def _local_nonfinite(tensors: Iterable[torch.Tensor | None]) -> bool:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            groups.setdefault((t.device, t.dtype), []).append(t)
    found = False
    for ts in groups.values():
        maxes = torch._foreach_norm(ts, float("inf"))
        # One host sync per (device, dtype) group.
        if not torch.stack(maxes).isfinite().all().item():
            found = True
            break
    return found


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        raise ValueError(f"DynamicLossScaler: {name} must be a finite number > 0, got {v!r}")


def _check_state(state: dict[str, Any], scaler: LossScalerBase) -> None:
    if not isinstance(state, dict) or state.get("type") not in ("static", "dynamic") or "cur_scale" not in state:
        raise ValueError(f"{type(scaler).__name__}.load_state_dict: not a loss-scaler state: {state!r}")
    if state.get("version", _STATE_VERSION) > _STATE_VERSION:
        raise ValueError(f"loss-scaler state version {state['version']} is newer than this amp-scaler understands")
