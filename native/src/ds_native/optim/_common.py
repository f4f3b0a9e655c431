"""Shared pieces of the Adam optimizer classes: hyperparameters, state, checks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, TypeVar

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ds_native.memory import copy_to_huge, zeros_huge

_Step = TypeVar("_Step", bound=Callable[..., Any])

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16)


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise ValueError naming the argument when a hyperparameter is out of range (as torch.optim.Adam does)."""
    if not float(lr) >= 0.0:
        raise ValueError(f"lr: invalid learning rate {lr}; expected >= 0")
    if not eps >= 0.0:
        raise ValueError(f"eps: invalid epsilon {eps}; expected >= 0")
    if len(betas) != 2 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"betas: invalid {betas}; expected two values in [0, 1)")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: invalid {weight_decay}; expected >= 0")


def check_tensor(t: torch.Tensor, what: str, *, device_type: str, dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise a clear error unless ``t`` is a dense contiguous tensor of ``device_type`` and one of ``dtypes``."""
    if t.is_sparse:
        raise TypeError(f"{what}: sparse tensors are not supported")
    if t.device.type != device_type:
        raise ValueError(f"{what}: on {t.device}, but this optimizer runs on {device_type} tensors only")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{what}: dtype {str(t.dtype).replace('torch.', '')} not supported; expected {names}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: must be contiguous (call .contiguous() first)")


def step_hooks(step: _Step) -> _Step:
    """torch.optim.Optimizer's step wrapper, minus its ``record_function`` when no profiler runs.

    torch wraps every optimizer's ``step`` to run the step pre/post hooks (global and
    per-optimizer, with the same arguments and the same right to replace them) inside
    ``record_function("Optimizer.step#<Class>.step")``. That context costs ~100 us per step
    on CPU even with no profiler running, because the step has just streamed the whole
    optimizer state through the caches and the dispatcher code it runs is cold: 2-3% of a
    10M-parameter Adam step. This wrapper runs the same hooks and opens the same profiler
    range, but only when a profiler is active. A subclass that overrides ``step`` gets torch's
    own wrapper (it is not marked ``hooked``) and this one steps aside, so hooks run once.
    """

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if type(self).step is not wrapper:  # a subclass's step, already hooked by torch
            return step(*args, **kwargs)
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                out = _hooked_call(step, self, args, kwargs)
                self._optimizer_step_code()  # the profiler's Python tracer hooks this
                return out
        return _hooked_call(step, self, args, kwargs)

    wrapper.hooked = True  # type: ignore[attr-defined]  # torch.optim.Optimizer then leaves it as it is
    return wrapper  # type: ignore[return-value]


def _hooked_call(step: Callable[..., Any], self: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


class AdamBase(torch.optim.Optimizer):
    """Param groups, state layout and state_dict interchange shared with torch.optim.Adam/AdamW.

    State per parameter is ``step`` (a float32 scalar tensor, as torch keeps it),
    ``exp_avg`` and ``exp_avg_sq`` (fp32, contiguous, the parameter's shape).
    Group keys are ``lr``, ``betas``, ``eps``, ``weight_decay``, ``adamw_mode``
    (DeepSpeed's name for torch's ``decoupled_weight_decay``) and ``bias_correction``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        adamw_mode: bool,
        bias_correction: bool,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "adamw_mode": bool(adamw_mode),
            "bias_correction": bool(bias_correction),
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A state_dict saved by torch.optim.Adam/AdamW has no adamw_mode or
        # bias_correction: take torch's decoupled_weight_decay (AdamW saves True).
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("adamw_mode", bool(group.get("decoupled_weight_decay", True)))
            group.setdefault("bias_correction", True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then the CPU moments moved onto huge pages (see ``ds_native.memory``)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                t = state.get(key)
                if (
                    isinstance(t, torch.Tensor)
                    and p.device.type == "cpu"
                    and t.device.type == "cpu"
                    and t.dtype == torch.float32
                    and t.is_contiguous()
                ):
                    state[key] = copy_to_huge(t)

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus the keys torch.optim.Adam/AdamW read, so either can load it."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group["decoupled_weight_decay"] = group["adamw_mode"]
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
        return sd

    @staticmethod
    def group_hyper(group: dict[str, Any]) -> dict[str, Any]:
        """The kernel's keyword arguments for one param group, rejecting torch options we do not implement."""
        for key in ("amsgrad", "maximize"):
            if group.get(key, False):
                raise NotImplementedError(f"param group option {key}=True is not supported by ds_native Adam")
        beta1, beta2 = group["betas"]
        return {
            "lr": float(group["lr"]),
            "beta1": float(beta1),
            "beta2": float(beta2),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "adamw_mode": bool(group["adamw_mode"]),
            "bias_correction": bool(group["bias_correction"]),
        }

    def state_for(self, p: torch.Tensor) -> dict[str, Any]:
        """This parameter's state, created on first use and normalised after a load (fp32, contiguous)."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = _zeros_moment(p)
            state["exp_avg_sq"] = _zeros_moment(p)
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            if t.dtype != torch.float32 or t.device != p.device or not t.is_contiguous() or t.shape != p.shape:
                if t.numel() != p.numel():
                    raise ValueError(f"state {key!r} has {t.numel()} elements but its parameter has {p.numel()}")
                state[key] = t.detach().to(device=p.device, dtype=torch.float32).contiguous().view(p.shape)
        step = state["step"]
        # A float32 CPU scalar, as torch keeps it off capturable/fused paths; the CPU kernel
        # increments it in place. Older checkpoints hold a number; capturable ones a device tensor.
        if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.device.type != "cpu":
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
        elif step.numel() != 1:
            raise ValueError(f"state 'step' has {step.numel()} elements; expected one step count")
        return state


def _zeros_moment(p: torch.Tensor) -> torch.Tensor:
    """A zeroed fp32 moment for ``p``; on CPU backed by huge pages, since every step streams it."""
    if p.device.type == "cpu":
        return zeros_huge(p.shape)
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device)
