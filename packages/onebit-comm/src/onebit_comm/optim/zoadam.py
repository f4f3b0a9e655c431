"""0/1 Adam (Lu et al., 2022, arXiv:2202.06009), configured as DeepSpeed's ``"ZeroOneAdam"``.

Two policies of the paper, with DeepSpeed 0.19's arithmetic and defaults:

- **Variance freeze** (steps ``<= var_freeze_step``): the variance is updated only on the steps of
  ``T_v``, which start every step and grow apart exponentially: after ``var_update_scaler`` updates
  the interval between updates doubles (kappa in the paper). On those steps the gradients are
  averaged in full precision (:meth:`needs_averaged_gradients` is True); on the others the local
  gradient is averaged with the 1-bit compressed all-reduce and only the momentum is updated.
- **Local steps** (steps ``> var_freeze_step``): the variance is frozen and each rank steps on its
  own gradients, accumulating its updates; every ``local_step_interval`` steps the accumulated
  updates are undone, converted to momentum space (times ``sqrt(v) + eps``), averaged with the
  1-bit all-reduce and re-applied, and the momentum is rebuilt from them. The interval starts at 1
  and doubles every ``local_step_scaler`` steps up to ``local_step_clipper`` (H in the paper). The
  error buffers are reset when this phase begins, as in DeepSpeed.

Update rule: ``p -= lr * (m / (sqrt(v) + eps) + weight_decay * p)`` (no bias correction, as DeepSpeed's).
Between synchronisations the ranks' parameters differ (that is the point of local steps), so a
checkpoint taken then stores every rank's parameters, momentum and accumulator (see
:meth:`rank_local_state_keys`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from onebit_comm.optim.base import CompressedOptimizer

__all__ = ["ZeroOneAdam"]


class ZeroOneAdam(CompressedOptimizer):
    """0/1 Adam: adaptive variance freezing and 1-bit synchronised local steps (see the module docstring).

    Args:
        params: parameters or param groups (``exp_avg_mask`` as for :class:`OneBitAdam`).
        lr, betas, eps, weight_decay: as for Adam (decoupled weight decay added to the update).
        var_freeze_step: the last step that may update the variance (DeepSpeed default 100000).
        var_update_scaler: variance updates per interval before the interval doubles (default 16).
        local_step_scaler: steps after which the local-step interval doubles (default 32678).
        local_step_clipper: the largest local-step interval (default 16).
        bias_correction, eps_inside_sqrt, max_grad_norm: accepted for DeepSpeed configs; no effect (as there).
        amsgrad: must be False. cuda_aware, comm_backend_name: accepted; torch.distributed carries the bytes.
        process_group: the data-parallel group (None: the default group).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        var_freeze_step: int = 100000,
        var_update_scaler: int = 16,
        local_step_scaler: int = 32678,
        local_step_clipper: int = 16,
        amsgrad: bool = False,
        cuda_aware: bool = False,
        comm_backend_name: str = "nccl",
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        for key, val, low in (
            ("var_freeze_step", var_freeze_step, 0),
            ("var_update_scaler", var_update_scaler, 1),
            ("local_step_scaler", local_step_scaler, 1),
            ("local_step_clipper", local_step_clipper, 1),
        ):
            if int(val) < low:
                raise ValueError(f"ZeroOneAdam: {key} must be an integer >= {low}, got {val!r}")
        super().__init__(
            params,
            name="ZeroOneAdam",
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
            settings={
                "var_freeze_step": int(var_freeze_step),
                "var_update_scaler": int(var_update_scaler),
                "local_step_scaler": int(local_step_scaler),
                "local_step_clipper": int(local_step_clipper),
            },
        )

    def needs_averaged_gradients(self) -> bool:
        """True on the variance-update steps of the first phase."""
        st = self._first_state()
        t = int(st.get("step", 0)) + 1
        return t <= self.var_freeze_step and t % int(st.get("var_interval", 1)) == 0

    def in_local_step_phase(self) -> bool:
        """Whether the next step is in the local-step phase (variance frozen)."""
        return int(self._first_state().get("step", 0)) + 1 > self.var_freeze_step

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["var_interval"] = 1
            state["var_counter"] = 0
            state["local_step_interval"] = 1
            state["local_step_counter"] = 0
            state["lrs"] = 0.0
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of whichever phase ``var_freeze_step`` puts the next step in."""
        loss = self._run_closure(closure)
        averaged = self.needs_averaged_gradients()
        for group, p, grad in self._grads():
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            state = self._init_state(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            t = state["step"] + 1
            if t <= self.var_freeze_step:
                if averaged:
                    grad = self._average_(grad)
                    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    m.mul_(b1).add_(grad, alpha=1 - b1)
                else:
                    g1 = self._compressed_(p, grad.clone())
                    self._mask_(group, g1)
                    m.mul_(b1).add_(g1, alpha=1 - b1)
                self._adam_update_(p, m, v, lr, eps, wd)
                if t % state["var_interval"] == 0:
                    state["var_counter"] += 1
                    if state["var_counter"] == self.var_update_scaler:
                        state["var_counter"] = 0
                        state["var_interval"] *= 2
            else:
                self._local_step(p, group, state, grad, t)
            state["step"] = t
        return loss

    def _local_step(
        self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor, t: int
    ) -> None:
        b1 = group["betas"][0]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if "momentum_accumulator" not in state:
            # Entering the local-step phase: fresh accumulator, and error buffers reset (DeepSpeed's rule).
            state["momentum_accumulator"] = torch.zeros_like(m)
            self._reset_errors(p)
        acc = state["momentum_accumulator"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        state["lrs"] += lr
        update = self._adam_update_(p, m, v, lr, eps, wd)
        acc.add_(update, alpha=-lr)
        if t % state["local_step_interval"] == 0:
            denom = v.sqrt() + eps
            p.sub_(acc)  # back to the parameters of the last synchronisation
            acc.mul_(denom)  # accumulated updates in momentum space: -sum(lr_i * m_i), roughly
            self._compressed_(p, acc)
            self._mask_(group, acc)
            m.copy_(acc).div_(-state["lrs"])
            p.add_(acc / denom)
            acc.zero_()
            state["lrs"] = 0.0
        state["local_step_counter"] += 1
        if state["local_step_counter"] == self.local_step_scaler:
            state["local_step_counter"] = 0
            state["local_step_interval"] = min(self.local_step_clipper, state["local_step_interval"] * 2)

    def rank_local_state_keys(self, p: torch.Tensor) -> list[str]:
        """Error buffers; in the local-step phase also the momentum, accumulator and parameters themselves."""
        keys = super().rank_local_state_keys(p)
        state = self.state.get(p, {})
        if "momentum_accumulator" in state:
            keys += ["momentum_accumulator", "exp_avg", "param"]
        return keys
