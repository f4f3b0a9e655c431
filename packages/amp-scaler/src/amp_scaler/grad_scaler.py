"""A ``torch.amp.GradScaler``-shaped front end with DeepSpeed's scaling rules.

For plain PyTorch loops that keep fp32 parameters and run the forward under
``torch.autocast(dtype=torch.float16)``: replace ``torch.amp.GradScaler()`` by
``amp_scaler.GradScaler()`` and the loop stays the same. ``unscale_`` also takes
``max_norm``, so unscale + overflow check + clip happen in one fused call instead of
``unscale_`` + ``clip_grad_norm_``:

    scaler = amp_scaler.GradScaler()                # DeepSpeed's fp16 defaults
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x)
    scaler.scale(loss).backward()
    scaler.unscale_(opt, max_norm=1.0)              # optional; returns the grad norm
    scaler.step(opt)                                # skipped on inf/nan (on any rank)
    scaler.update()

Differences from torch's: the scale follows DeepSpeed's rules (hysteresis, window counted
from the last overflow, an error at the minimum scale); ``update()`` takes no new scale.
"""

from __future__ import annotations

from typing import Any

import torch

from amp_scaler._dist import ProcessGroup
from amp_scaler.scaler import DynamicLossScaler, LossScalerBase
from amp_scaler.unscale import unscale_and_clip_

__all__ = ["GradScaler"]


class GradScaler:
    """``scale`` / ``unscale_`` / ``step`` / ``update`` over a :class:`LossScalerBase`.

    Args:
        loss_scaler: the scaler; default ``DynamicLossScaler()`` (DeepSpeed's fp16 defaults).
        enabled: False makes every call a pass-through (as torch's ``enabled=False``).
        process_group: group that agrees on overflow; gradients are taken to be identical on
            every rank (DDP), so the norm is not summed over ranks.
    """

    def __init__(
        self, loss_scaler: LossScalerBase | None = None, *, enabled: bool = True, process_group: ProcessGroup = None
    ) -> None:
        self.loss_scaler = loss_scaler if loss_scaler is not None else DynamicLossScaler(process_group=process_group)
        self.enabled = enabled
        self.process_group = process_group
        # Per optimizer in this iteration: (grad norm, found_inf) once unscaled.
        self._unscaled: dict[int, tuple[float, bool]] = {}

    def is_enabled(self) -> bool:
        """Whether scaling is on."""
        return self.enabled

    def get_scale(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        return self.loss_scaler.loss_scale if self.enabled else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``."""
        return self.loss_scaler.scale_loss(loss) if self.enabled else loss

    def unscale_(self, optimizer: torch.optim.Optimizer, max_norm: float = 0.0, norm_type: float = 2.0) -> float:
        """Unscale the optimizer's gradients in place (and clip when ``max_norm > 0``); return the norm.

        At most once per optimizer between two :meth:`update` calls, as with torch.
        """
        if not self.enabled:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
            norm, _ = unscale_and_clip_(grads, 1.0, max_norm, self.process_group, norm_type, sharded=False)
            return norm
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        norm, found_inf = unscale_and_clip_(
            grads, self.loss_scaler.inv_scale, max_norm, self.process_group, norm_type, sharded=False
        )
        self._unscaled[id(optimizer)] = (norm, found_inf)
        return norm

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale if not done yet, then ``optimizer.step()`` unless the gradients overflowed."""
        if not self.enabled:
            return optimizer.step(*args, **kwargs)
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        _, found_inf = self._unscaled[id(optimizer)]
        if found_inf:
            return None
        return optimizer.step(*args, **kwargs)

    def update(self) -> None:
        """Update the scale with this iteration's outcome (overflow in any unscaled optimizer)."""
        if not self.enabled:
            return
        overflow = any(found for _, found in self._unscaled.values())
        self._unscaled.clear()
        self.loss_scaler.update_scale(overflow)

    @property
    def skipped_steps(self) -> int:
        """Iterations skipped for inf/nan gradients."""
        return self.loss_scaler.skipped_steps

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's JSON-able state."""
        return self.loss_scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.loss_scaler.load_state_dict(state)
