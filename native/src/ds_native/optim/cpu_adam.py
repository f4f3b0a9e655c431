"""CPU Adam/AdamW over the compiled kernel: fp32 master params and moments,
fp32/bf16/fp16 gradients, optional bf16/fp16 copy-out of the updated params.

One pass over memory per step: for ZeRO-Offload's step (bf16 grads in, fp32
master and moments updated, bf16 params out) that is 30 bytes per parameter,
where torch needs three passes (upcast the grads, fused step, downcast).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ds_native import _ds_native_cpu
from ds_native.optim._common import GRAD_DTYPES, OUT_DTYPES, AdamBase, check_tensor

_F32 = (torch.float32,)


def cpu_adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int] | int,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    adamw_mode: bool = True,
    bias_correction: bool = True,
    out: Sequence[torch.Tensor] | None = None,
    num_threads: int | None = None,
) -> None:
    """One Adam (``adamw_mode=False``: L2 weight decay) or AdamW step, in place, in one pass.

    ``params``, ``exp_avgs``, ``exp_avg_sqs``: contiguous fp32 CPU tensors.
    ``grads``: contiguous CPU tensors, fp32, bf16 or fp16, same sizes.
    ``steps``: each tensor's step count *after* this update (1 on the first step), or one int for all.
    ``out``: optional bf16/fp16 tensors that receive the updated params rounded to nearest even.
    ``num_threads``: default ``torch.get_num_threads()``. The GIL is released while the kernel runs;
    results are bitwise the same for any thread count and any ISA variant.
    """
    n = len(params)
    if isinstance(steps, int):
        steps = [steps] * n
    for name, seq in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)):
        if len(seq) != n:
            raise ValueError(f"{name}: has {len(seq)} entries but params has {n}")
    if out is not None and len(out) != n:
        raise ValueError(f"out: has {len(out)} entries but params has {n}")
    for i in range(n):
        check_tensor(params[i], f"params[{i}]", device_type="cpu", dtypes=_F32)
        check_tensor(grads[i], f"grads[{i}]", device_type="cpu", dtypes=GRAD_DTYPES)
        check_tensor(exp_avgs[i], f"exp_avgs[{i}]", device_type="cpu", dtypes=_F32)
        check_tensor(exp_avg_sqs[i], f"exp_avg_sqs[{i}]", device_type="cpu", dtypes=_F32)
        if out is not None:
            check_tensor(out[i], f"out[{i}]", device_type="cpu", dtypes=OUT_DTYPES)
    if n == 0:
        return
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    _ds_native_cpu.adam_step(
        [p.detach() for p in params],
        [g.detach() for g in grads],
        list(exp_avgs),
        list(exp_avg_sqs),
        [] if out is None else [o.detach() for o in out],
        [int(s) for s in steps],
        float(lr),
        float(betas[0]),
        float(betas[1]),
        float(eps),
        float(weight_decay),
        bool(adamw_mode),
        bool(bias_correction),
        threads,
    )


class CPUAdam(AdamBase):
    """Adam/AdamW on CPU tensors with the compiled, runtime-dispatched kernel (drop-in for DeepSpeedCPUAdam).

    Args:
        params: parameters or param groups (dicts may override any hyperparameter).
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        adamw_mode: True: decoupled weight decay (AdamW); False: L2 added to the gradient (Adam).
        bias_correction: apply Adam's bias correction (default True).
        num_threads: threads for the kernel; default follows ``torch.get_num_threads()`` at each step.

    Parameters must be contiguous fp32 CPU tensors. State keys (``step``, ``exp_avg``,
    ``exp_avg_sq``) and their layout are torch.optim.AdamW's, so ``state_dict()`` moves
    between this class and torch.optim.Adam/AdamW in both directions.
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
        *,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads: {num_threads} invalid; expected a positive int or None")
        self.num_threads = num_threads
        super().__init__(params, lr, betas, eps, weight_decay, adamw_mode, bias_correction)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        *,
        grads: Sequence[torch.Tensor | None] | None = None,
        out: Sequence[torch.Tensor | None] | None = None,
    ) -> float | None:
        """One optimizer step.

        ``grads``: optional gradients to use instead of ``p.grad``, one per parameter in
        param-group order (``[p for g in param_groups for p in g["params"]]``), fp32/bf16/fp16;
        ``None`` entries skip that parameter. This is how ZeRO-Offload hands in bf16/fp16
        gradients for fp32 master params.
        ``out``: optional bf16/fp16 tensors in the same order (``None`` entries: no copy-out)
        that receive the updated params rounded to nearest even, in the same pass.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = [p for group in self.param_groups for p in group["params"]]
        for name, seq in (("grads", grads), ("out", out)):
            if seq is not None and len(seq) != len(flat):
                raise ValueError(f"step({name}=...): {len(seq)} entries, but the optimizer has {len(flat)} parameters")
        threads = self.num_threads if self.num_threads is not None else torch.get_num_threads()
        index = 0
        for group_index, group in enumerate(self.param_groups):
            hyper = self.group_hyper(group)
            # Two calls per group at most: with and without copy-out.
            batches: dict[bool, list[list[Any]]] = {False: [[], [], [], [], [], []], True: [[], [], [], [], [], []]}
            for p in group["params"]:
                g = p.grad if grads is None else grads[index]
                o = None if out is None else out[index]
                index += 1
                if g is None:
                    continue
                where = f"param {index - 1} (group {group_index})"
                check_tensor(p, where, device_type="cpu", dtypes=_F32)
                check_tensor(g, f"gradient of {where}", device_type="cpu", dtypes=GRAD_DTYPES)
                if g.numel() != p.numel():
                    raise ValueError(f"gradient of {where}: {g.numel()} elements, the param has {p.numel()}")
                if o is not None:
                    check_tensor(o, f"out for {where}", device_type="cpu", dtypes=OUT_DTYPES)
                    if o.numel() != p.numel():
                        raise ValueError(f"out for {where}: {o.numel()} elements, the param has {p.numel()}")
                state = self.state_for(p)
                new_step = int(state["step"].item()) + 1
                state["step"].fill_(new_step)
                batch = batches[o is not None]
                items = (p.detach(), g.detach(), state["exp_avg"], state["exp_avg_sq"], o, new_step)
                for lst, item in zip(batch, items, strict=True):
                    lst.append(item)
            for has_out, (ps, gs, ms, vs, os, steps) in batches.items():
                if not ps:
                    continue
                outs = [o.detach() for o in os] if has_out else []
                _ds_native_cpu.adam_step(ps, gs, ms, vs, outs, steps, **hyper, num_threads=threads)
        return loss
