"""Multi-tensor fused Adam/AdamW on CUDA (the kernel lives in the lazily loaded CUDA extension)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ds_native.optim._common import GRAD_DTYPES, AdamBase, check_tensor


class FusedAdam(AdamBase):
    """Adam/AdamW for CUDA tensors: one kernel launch updates many tensors (up to 48 per launch).

    Params may be fp32, bf16 or fp16 (math in fp32, the result rounded to nearest even on store);
    moments are fp32; gradients fp32/bf16/fp16. Launches go on the current torch stream of the
    params' device. Same arguments, state layout and state_dict interchange as :class:`CPUAdam`.
    Importing this class needs no CUDA; the extension loads on the first ``step()``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adamw_mode: bool = True,
        bias_correction: bool = True,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, adamw_mode, bias_correction)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step over every parameter that has a ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            hyper = self.group_hyper(group)
            # One call per (device, param dtype, grad dtype, step): each call shares its coefficients.
            batches: dict[tuple[Any, ...], list[list[torch.Tensor]]] = {}
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param {i} of group {group_index}"
                check_tensor(p, where, device_type="cuda", dtypes=GRAD_DTYPES)
                check_tensor(p.grad, f"gradient of {where}", device_type="cuda", dtypes=GRAD_DTYPES)
                state = self.state_for(p)
                state["step"] += 1
                step = int(state["step"].item())
                key = (p.device, p.dtype, p.grad.dtype, step)
                batch = batches.setdefault(key, [[], [], [], []])
                for lst, t in zip(batch, (p, p.grad, state["exp_avg"], state["exp_avg_sq"]), strict=True):
                    lst.append(t.detach())
            if batches:
                from ds_native import cuda_ops  # loads the CUDA extension; a clear error if it was not built
            for (device, _, _, step), (ps, gs, ms, vs) in batches.items():
                cuda_ops.fused_adam(ps, gs, ms, vs, step=step, device=device, **hyper)
        return loss
