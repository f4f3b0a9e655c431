"""Mixed-precision optimizer wrapper for the no-ZeRO case (stage 0): fp16/bf16 model, fp32 master.

The model keeps its fp16/bf16 parameters (fast forward/backward, half the memory); the
wrapped optimizer steps fp32 copies of them ("master weights"), so small updates are not
lost to rounding, and the result is copied back into the model after each step. With fp16
the loss is scaled (dynamic by default) and an overflowed step is skipped on every rank.

    model = MyModel().half()
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), clip_grad=1.0)
    for x, y in data:
        loss = loss_fn(model(x.half()), y)
        opt.backward(loss)      # scaled backward
        opt.step()              # unscale + norm + clip + step (False when skipped), copy back
        opt.zero_grad()

Parameters that are already fp32 are stepped in place (no copy). Data parallelism: wrap the
model in DDP as usual; the gradients are then identical on every rank, so the norm is local
and only the overflow decision is agreed over ``process_group``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from amp_scaler._dist import ProcessGroup
from amp_scaler.checkpoint import merge_tensors, split_tensors
from amp_scaler.scaler import DynamicLossScaler, LossScalerBase, StaticLossScaler, create_loss_scaler
from amp_scaler.unscale import unscale_and_clip_

if TYPE_CHECKING:
    from collections.abc import Callable

    from amp_scaler.config import BF16Config, FP16Config

__all__ = ["MixedPrecisionOptimizer"]

_LOW = (torch.float16, torch.bfloat16)


class MixedPrecisionOptimizer:
    """Wrap any ``torch.optim.Optimizer`` built over fp16/bf16 parameters with fp32 master weights.

    Args:
        optimizer: a fresh optimizer over the model's parameters (no state yet). Its
            low-precision parameters are replaced by fp32 masters in its param groups.
        loss_scaler: the scaler to use; default: :class:`DynamicLossScaler` with DeepSpeed's
            defaults when any parameter is fp16, else ``StaticLossScaler(1.0)``.
        clip_grad: clip the global gradient norm to this value (0: no clipping; DeepSpeed's
            ``gradient_clipping``).
        process_group: group that agrees on overflow (None: the default group when
            torch.distributed is initialized).
        immediate_grad_update: DeepSpeed's ``bf16.immediate_grad_update``: as soon as backward
            produces a parameter's low-precision gradient, add it into the fp32 master gradient
            and free it (a post-accumulate-grad hook), so gradient accumulation over
            micro-batches happens in fp32 instead of bf16/fp16.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        loss_scaler: LossScalerBase | None = None,
        *,
        clip_grad: float = 0.0,
        process_group: ProcessGroup = None,
        immediate_grad_update: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MixedPrecisionOptimizer: optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        if optimizer.state:
            raise ValueError(
                "MixedPrecisionOptimizer: wrap a fresh optimizer (its state is keyed by the low-precision "
                "parameters); load saved state afterwards with load_state_dict()"
            )
        if clip_grad < 0:
            raise ValueError(f"MixedPrecisionOptimizer: clip_grad must be >= 0 (0 = off), got {clip_grad!r}")
        self.optimizer = optimizer
        self.clip_grad = float(clip_grad)
        self.process_group = process_group
        self.model_params: list[torch.Tensor] = []
        self.master_params: list[torch.Tensor] = []
        for group in optimizer.param_groups:
            masters = []
            for p in group["params"]:
                if p.dtype in _LOW:
                    m = p.detach().clone().float()
                    m.requires_grad_(True)
                else:
                    m = p
                self.model_params.append(p)
                self.master_params.append(m)
                masters.append(m)
            group["params"] = masters
        # Pairs that need a cast copy (low-precision model param, fp32 master).
        self._low = [(p, m) for p, m in zip(self.model_params, self.master_params, strict=True) if p is not m]
        if loss_scaler is None:
            has_fp16 = any(p.dtype == torch.float16 for p in self.model_params)
            loss_scaler = DynamicLossScaler(process_group=process_group) if has_fp16 else StaticLossScaler(1.0)
        self.loss_scaler = loss_scaler
        self.immediate_grad_update = bool(immediate_grad_update)
        self._hooks = []
        if self.immediate_grad_update:
            for p, m in self._low:
                self._hooks.append(p.register_post_accumulate_grad_hook(_make_hook(m)))
        self.global_grad_norm: float | None = None
        """The global gradient norm of the last :meth:`step` (unscaled, before clipping)."""
        self.overflow = False
        """Whether the last :meth:`step` was skipped for inf/nan gradients."""

    @classmethod
    def from_config(
        cls,
        optimizer: torch.optim.Optimizer,
        fp16: FP16Config | None = None,
        bf16: BF16Config | None = None,
        *,
        gradient_clipping: float = 0.0,
        process_group: ProcessGroup = None,
    ) -> MixedPrecisionOptimizer:
        """Build from the ``"fp16"``/``"bf16"`` sections and ``gradient_clipping`` of a ds_config."""
        from amp_scaler.config import check_precision

        check_precision(fp16, bf16)
        if fp16 is not None and fp16.enabled is True and fp16.fp16_master_weights_and_grads:
            raise ValueError(
                "fp16.fp16_master_weights_and_grads needs ZeRO with CPU Adam (as in DeepSpeed); "
                "MixedPrecisionOptimizer (no ZeRO) always keeps fp32 master weights"
            )
        scaler = create_loss_scaler(fp16, process_group=process_group)
        immediate = bf16 is not None and bf16.enabled is True and bf16.immediate_grad_update
        return cls(
            optimizer,
            scaler,
            clip_grad=gradient_clipping,
            process_group=process_group,
            immediate_grad_update=immediate,
        )

    # -- the training step ---------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's param groups (over the fp32 masters); LR schedulers set ``lr`` here."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        """The wrapped optimizer's per-parameter state (keyed by the fp32 masters)."""
        return self.optimizer.state

    @property
    def loss_scale(self) -> float:
        """The current loss scale."""
        return self.loss_scaler.loss_scale

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the gradients held inf/nan."""
        return self.loss_scaler.skipped_steps

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale``, for callers that run backward themselves."""
        return self.loss_scaler.scale_loss(loss)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Back-propagate ``loss * loss_scale`` into the model's gradients."""
        self.loss_scaler.backward(loss, retain_graph=retain_graph)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's and the masters' gradients."""
        for _, m in self._low:
            if set_to_none:
                m.grad = None
            elif m.grad is not None:
                m.grad.zero_()
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self, closure: Callable[[], Any] | None = None) -> bool:
        """Unscale, check overflow, clip, step the masters and copy them into the model.

        Returns False (and changes no parameter) when the gradients held inf/nan on any rank
        of the group; the loss scale is updated either way (DeepSpeed's rules).
        """
        self._masters_grads_from_model()
        grads = [m.grad for m in self.master_params]
        norm, found_inf = unscale_and_clip_(
            grads, self.loss_scaler.inv_scale, self.clip_grad, self.process_group, sharded=False
        )
        self.global_grad_norm = norm
        self.overflow = found_inf
        self.loss_scaler.update_scale(found_inf)
        if found_inf:
            self.zero_grad()
            return False
        self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self._model_from_masters()
        return True

    def _masters_grads_from_model(self) -> None:
        if self.immediate_grad_update:
            # The hooks already moved every gradient into the masters; pick up any left over
            # (a gradient assigned by hand rather than produced by backward).
            for p, m in self._low:
                if p.grad is not None:
                    _accumulate(m, p)
            return
        for p, m in self._low:
            if p.grad is None:
                m.grad = None
            elif m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.copy_(p.grad)

    @torch.no_grad()
    def _model_from_masters(self) -> None:
        if self._low:
            torch._foreach_copy_([p for p, _ in self._low], [m for _, m in self._low])

    def remove_hooks(self) -> None:
        """Detach the ``immediate_grad_update`` hooks from the model's parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Inner optimizer state, fp32 master weights and the loss scaler's state.

        Tensors are plain tensors; everything else is JSON-able. :func:`amp_scaler.split_tensors`
        turns it into ``(tensors, json_meta)`` for safetensors + JSON (no pickle).
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "master_weights": [m.detach() for m in self.master_params],
            "loss_scaler": self.loss_scaler.state_dict(),
            "clip_grad": self.clip_grad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also the model's parameters, from the masters)."""
        masters = state["master_weights"]
        if len(masters) != len(self.master_params):
            raise ValueError(
                f"MixedPrecisionOptimizer.load_state_dict: {len(masters)} saved master weights, "
                f"this optimizer has {len(self.master_params)} parameters"
            )
        with torch.no_grad():
            for i, (m, saved) in enumerate(zip(self.master_params, masters, strict=True)):
                if m.shape != saved.shape:
                    raise ValueError(
                        f"MixedPrecisionOptimizer.load_state_dict: master weight {i} has shape "
                        f"{tuple(saved.shape)}, expected {tuple(m.shape)}"
                    )
                m.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        self._model_from_masters()

    def split_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """:meth:`state_dict` as ``(tensors, json_meta)``: save with safetensors + ``json.dump``."""
        return split_tensors(self.state_dict())

    def load_split_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`split_state_dict`."""
        self.load_state_dict(merge_tensors(tensors, meta))

    def __repr__(self) -> str:
        return f"MixedPrecisionOptimizer({self.optimizer.__class__.__name__}, {self.loss_scaler!r}, clip_grad={self.clip_grad})"


def _accumulate(master: torch.Tensor, param: torch.Tensor) -> None:
    """Add ``param.grad`` into ``master.grad`` in fp32 and free the low-precision gradient."""
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad.add_(param.grad)
    param.grad = None


def _make_hook(master: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        _accumulate(master, param)

    return hook
