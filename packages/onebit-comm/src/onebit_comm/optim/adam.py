"""1-bit Adam (Tang et al., 2021, arXiv:2102.02888), configured as DeepSpeed's ``"OneBitAdam"``.

Warm-up (steps ``1..freeze_step``): Adam on gradients averaged in full precision. Then the variance
``exp_avg_sq`` is frozen and every step all-reduces the *momentum* with 1-bit compression and error
feedback instead of the gradients: ``m = b1 m + (1 - b1) g_local; m = compressed_allreduce(m)``.

The update is DeepSpeed 0.19's: ``p -= lr * (m / (sqrt(v) + eps) + weight_decay * p)``, no bias
correction (``bias_correction``, ``eps_inside_sqrt`` and ``max_grad_norm`` are accepted and, as in
DeepSpeed, have no effect). Unlike DeepSpeed there is no silent first "initialisation" step (which
advanced the step counter without updating), so step ``k`` here is DeepSpeed's step ``k + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from onebit_comm.optim.base import CompressedOptimizer

__all__ = ["OneBitAdam"]


class OneBitAdam(CompressedOptimizer):
    """1-bit Adam: Adam for ``freeze_step`` steps, then frozen variance and 1-bit compressed momentum.

    Args:
        params: parameters or param groups. A group may carry ``exp_avg_mask`` (a tensor shaped like its
            parameter) to keep momentum entries that are always zero at zero, as DeepSpeed's does.
        lr, betas, eps, weight_decay: Adam's (decoupled weight decay added to the update, DeepSpeed's rule).
        freeze_step: warm-up steps before compression starts (DeepSpeed's default 100000).
        bias_correction, eps_inside_sqrt, max_grad_norm: accepted for DeepSpeed configs; no effect (as there).
        amsgrad: must be False. cuda_aware, comm_backend_name: DeepSpeed's transport switches; here the
            collective always runs over torch.distributed's backend (gloo, NCCL, ...).
        process_group: the data-parallel group (None: the default group).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        freeze_step: int = 100000,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        amsgrad: bool = False,
        cuda_aware: bool = False,
        comm_backend_name: str = "nccl",
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if int(freeze_step) < 0:
            raise ValueError(f"OneBitAdam: freeze_step must be >= 0, got {freeze_step!r}")
        super().__init__(
            params,
            name="OneBitAdam",
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            eps_inside_sqrt=eps_inside_sqrt,
            max_grad_norm=max_grad_norm,
            amsgrad=amsgrad,
            cuda_aware=cuda_aware,
            comm_backend_name=comm_backend_name,
            process_group=process_group,
            settings={"freeze_step": int(freeze_step)},
        )

    def needs_averaged_gradients(self) -> bool:
        """True during warm-up (steps ``<= freeze_step``): the gradients must be averaged in full precision."""
        return self._next_step() <= self.freeze_step

    def in_compression_phase(self) -> bool:
        """Whether the next step communicates compressed momentum."""
        return not self.needs_averaged_gradients()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step (see the module docstring); gradients local, or averaged during warm-up."""
        loss = self._run_closure(closure)
        warm = self.needs_averaged_gradients()
        for group, p, grad in self._grads():
            b1, b2 = group["betas"]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if warm:
                grad = self._average_(grad)
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            else:
                m.mul_(b1).add_(grad, alpha=1 - b1)
                self._compressed_(p, m)
                self._mask_(group, m)
            self._adam_update_(p, m, v, group["lr"], group["eps"], group["weight_decay"])
            state["step"] += 1
        return loss
