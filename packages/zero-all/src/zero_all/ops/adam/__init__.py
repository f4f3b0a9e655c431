"""``zero_all.ops.adam``: DeepSpeed's ``FusedAdam`` and ``DeepSpeedCPUAdam``, on ds-native's kernels.

Both take DeepSpeed's constructor arguments (``adam_w_mode`` / ``adamw_mode``, ``bias_correction``,
``amsgrad``, ``set_grad_none``, ``fp32_optimizer_states``) and are ``torch.optim.Optimizer``s with
ds-native's state layout (fp32 ``exp_avg`` / ``exp_avg_sq`` / ``step`` per parameter), so a
checkpoint of one loads into the other.

- :class:`FusedAdam`: ds-native's multi-tensor CUDA kernel for CUDA parameters; for CPU parameters
  ds-native's SIMD CPU Adam (DeepSpeed's CPU accelerator also has a CPU FusedAdam). AMSGrad is
  refused, as in DeepSpeed.
- :class:`DeepSpeedCPUAdam`: ds-native's CPU Adam (fp32 parameters, the ZeRO-Offload optimizer).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ds_native.optim import CPUAdam as _NativeCPUAdam
from ds_native.optim import FusedAdam as _NativeFusedAdam

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]


class DeepSpeedCPUAdam(_NativeCPUAdam):
    """DeepSpeed's ``DeepSpeedCPUAdam`` (same arguments, in DeepSpeed's order) over ds-native's CPU Adam.

    Args:
        model_params: parameters or param groups (fp32 CPU tensors).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        bias_correction: apply Adam's bias correction (default True).
        amsgrad: not supported (ValueError when True, as DeepSpeed documents).
        adamw_mode: decoupled (AdamW) weight decay when True (default), L2 (Adam) when False.
        fp32_optimizer_states: DeepSpeed's switch for 16-bit moments; ds-native keeps fp32 moments
            always, so False is accepted with a warning (more memory, not less precision).
    """

    def __init__(
        self,
        model_params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        adamw_mode: bool = True,
        fp32_optimizer_states: bool = True,
    ) -> None:
        if amsgrad:
            raise ValueError("DeepSpeedCPUAdam: amsgrad=True is not supported (DeepSpeed's CPU Adam has no AMSGrad)")
        if not fp32_optimizer_states:
            warnings.warn(
                "DeepSpeedCPUAdam: fp32_optimizer_states=False is not implemented; the moments stay fp32",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(
            model_params,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            adamw_mode=adamw_mode,
            bias_correction=bias_correction,
        )
        self.fp32_optimizer_states = True


class FusedAdam(_NativeFusedAdam, _NativeCPUAdam):
    """DeepSpeed's ``FusedAdam`` (same arguments): ds-native's CUDA kernel, or its CPU kernel for CPU params.

    Args:
        params: parameters or param groups, all on CUDA or all on the CPU.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        bias_correction: apply Adam's bias correction (default True).
        adam_w_mode: decoupled (AdamW) weight decay when True (default), L2 (Adam) when False.
        amsgrad: refused (RuntimeError), as DeepSpeed's FusedAdam does.
        set_grad_none: ``zero_grad()`` sets gradients to None (default True; False zeroes them).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        set_grad_none: bool = True,
    ) -> None:
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        # MRO: ds-native FusedAdam -> CPUAdam -> AdamBase; both take these arguments in this order.
        super().__init__(params, lr, tuple(betas), eps, weight_decay, adam_w_mode, bias_correction)
        self.set_grad_none = set_grad_none

    def _device_type(self) -> str:
        types = {p.device.type for g in self.param_groups for p in g["params"]}
        if len(types) != 1 or not types <= {"cpu", "cuda"}:
            raise RuntimeError(f"FusedAdam: parameters must all be on CUDA or all on the CPU, got {sorted(types)}")
        return types.pop()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Adam step over every parameter with a gradient (CUDA kernel or CPU kernel by device)."""
        if self._device_type() == "cpu":
            return _NativeCPUAdam.step(self, closure)
        return _NativeFusedAdam.step(self, closure)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Clear gradients: None when ``set_grad_none`` (or ``set_to_none``) is true, else zero them."""
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)
