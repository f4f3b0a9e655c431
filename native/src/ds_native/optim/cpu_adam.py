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
from ds_native.optim._common import GRAD_DTYPES, OUT_DTYPES, AdamBase, check_tensor, step_hooks

_F32 = (torch.float32,)
_FLOAT32 = torch.float32
# ds::DType codes of the kernel's record format (csrc/cpu/dispatch.h).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OUT_CODES = {torch.bfloat16: 1, torch.float16: 2}


def _record(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor | None,
    step_counter: torch.Tensor | None,
    step: int,
) -> tuple[int, ...]:
    """The kernel's 9 int64 fields for one tensor (see ``adam_step`` in csrc/cpu/bindings.cpp)."""
    out_ptr, out_code = (0, 0) if o is None else (o.data_ptr(), _OUT_CODES[o.dtype])
    counter = 0 if step_counter is None else step_counter.data_ptr()
    dtypes = _DTYPE_CODES[g.dtype] | out_code << 8
    return (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), out_ptr, counter, step, p.numel(), dtypes)


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
    records: list[int] = []
    for i in range(n):
        check_tensor(params[i], f"params[{i}]", device_type="cpu", dtypes=_F32)
        numel = params[i].numel()
        checks = [(grads, "grads", GRAD_DTYPES), (exp_avgs, "exp_avgs", _F32), (exp_avg_sqs, "exp_avg_sqs", _F32)]
        if out is not None:
            checks.append((out, "out", OUT_DTYPES))
        for seq, name, dtypes in checks:
            check_tensor(seq[i], f"{name}[{i}]", device_type="cpu", dtypes=dtypes)
            if seq[i].numel() != numel:
                raise ValueError(f"{name}[{i}]: has {seq[i].numel()} elements, but params[{i}] has {numel}")
        if int(steps[i]) < 1:
            raise ValueError(f"steps[{i}]: {steps[i]} invalid; the step count after this update is >= 1")
        o = None if out is None else out[i]
        records.extend(_record(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], o, None, int(steps[i])))
    if n == 0:
        return
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    # The caller's sequences keep every tensor alive while the GIL is released.
    _ds_native_cpu.adam_step(
        records,
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

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults, state and param groups.
        return {**super().__getstate__(), "num_threads": self.num_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.num_threads = state.pop("num_threads", None)
        super().__setstate__(state)

    # No torch.no_grad() here: the step runs no autograd-visible torch op (the kernel
    # writes through raw addresses), and every wrapper this method passes through runs
    # with cold caches after a step has streamed the whole optimizer state.
    @step_hooks
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
        if grads is not None or out is not None:
            count = sum(len(group["params"]) for group in self.param_groups)
            for name, seq in (("grads", grads), ("out", out)):
                if seq is not None and len(seq) != count:
                    raise ValueError(f"step({name}=...): {len(seq)} entries, but the optimizer has {count} parameters")
        threads = self.num_threads if self.num_threads is not None else torch.get_num_threads()
        f32 = _FLOAT32
        codes = _DTYPE_CODES
        index = 0
        for group_index, group in enumerate(self.param_groups):
            # Records of the tensors with and without copy-out; the kernel takes one kind per call.
            plain: list[int] = []
            with_out: list[int] = []
            alive: list[torch.Tensor] = []  # p.grad may be replaced while the GIL is released
            for p in group["params"]:
                g = p.grad if grads is None else grads[index]
                o = None if out is None else out[index]
                index += 1
                if g is None:
                    continue
                state = self.state[p]
                # Fast path: everything already as the kernel needs it. Any surprise (a new or
                # loaded state, a wrong dtype or device, a sparse tensor) takes the checked path,
                # which normalises the state or raises an error naming the tensor.
                try:
                    m, v, counter = state["exp_avg"], state["exp_avg_sq"], state["step"]
                    n = p.numel()
                    ok = (
                        p.dtype is f32
                        and m.dtype is f32
                        and v.dtype is f32
                        and counter.dtype is f32
                        and g.dtype in codes
                        and p.is_cpu
                        and g.is_cpu
                        and m.is_cpu
                        and v.is_cpu
                        and counter.is_cpu
                        and counter.numel() == 1
                        and g.numel() == n
                        and m.numel() == n
                        and v.numel() == n
                        and p.is_contiguous()
                        and g.is_contiguous()
                        and m.is_contiguous()
                        and v.is_contiguous()
                    )
                    if ok and o is not None:
                        ok = o.dtype in _OUT_CODES and o.is_cpu and o.numel() == n and o.is_contiguous()
                except (KeyError, AttributeError, RuntimeError):
                    ok = False
                if not ok:
                    state = self._checked_state(p, g, o, f"param {index - 1} (group {group_index})")
                    m, v, counter = state["exp_avg"], state["exp_avg_sq"], state["step"]
                alive.append(g)
                if o is None:  # the common case, inlined: this loop runs once per parameter per step
                    plain += (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0, counter.data_ptr())
                    plain += (0, p.numel(), codes[g.dtype])
                else:
                    with_out.extend(_record(p, g, m, v, o, counter, 0))
            if plain or with_out:
                hyper = self.group_hyper(group)
                for records in (plain, with_out):
                    if records:
                        _ds_native_cpu.adam_step(records, **hyper, num_threads=threads)
        return loss

    def _checked_state(self, p: torch.Tensor, g: torch.Tensor, o: torch.Tensor | None, where: str) -> dict[str, Any]:
        """Check one parameter's tensors with errors that name them; return its (normalised) state."""
        check_tensor(p, where, device_type="cpu", dtypes=_F32)
        check_tensor(g, f"gradient of {where}", device_type="cpu", dtypes=GRAD_DTYPES)
        if g.numel() != p.numel():
            raise ValueError(f"gradient of {where}: {g.numel()} elements, the param has {p.numel()}")
        if o is not None:
            check_tensor(o, f"out for {where}", device_type="cpu", dtypes=OUT_DTYPES)
            if o.numel() != p.numel():
                raise ValueError(f"out for {where}: {o.numel()} elements, the param has {p.numel()}")
        return self.state_for(p)
