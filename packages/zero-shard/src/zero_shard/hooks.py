"""Module hooks for stage 3: fetch a module's units before its forward and its backward, release after.

Nothing else lives here: what to fetch, keep and release is decided by the
:class:`~zero_shard.stage3.ParamCoordinator` that the hooks call.

- forward pre-hook: ``coordinator.fetch(units)``;
- forward post-hook: ``coordinator.after_forward(units)`` and, when the output needs gradients, the
  output tensors pass through :class:`_BeforeBackward`, an identity whose backward fetches the units
  again before autograd reaches the module's own backward (which reads the saved parameter views);
- release after backward is driven by the parameters' post-accumulate-grad hooks (the coordinator's),
  since a module's backward has no reliable "done" hook of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from zero_shard.partition import Unit
    from zero_shard.stage3 import ParamCoordinator

__all__ = ["in_backward", "install_module_hooks", "map_tensors"]


def in_backward() -> bool:
    """True while autograd is running a backward (e.g. an activation-checkpoint recompute)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a (nested) output: tensors, tuples, lists, dicts (HF ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(x, fn) for x in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        # In place keeps the mapping's own class (an OrderedDict subclass such as transformers' ModelOutput).
        for k in list(obj.keys()):
            obj[k] = map_tensors(obj[k], fn)
        return obj
    return obj


class _BeforeBackward(torch.autograd.Function):
    """Identity in forward; in backward, fetch the module's units before its own backward runs."""

    @staticmethod
    def forward(ctx: Any, callback: Callable[[], None], *tensors: torch.Tensor) -> Any:  # type: ignore[override]
        ctx.callback = callback
        # detach(), not view_as(): a view returned by a custom Function may not be modified in place later.
        out = tuple(t.detach() for t in tensors)
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:  # type: ignore[override]
        ctx.callback()
        return (None, *grads)


def _wrap_outputs(output: Any, callback: Callable[[], None]) -> Any:
    needs: list[torch.Tensor] = []
    map_tensors(output, lambda t: needs.append(t) or t)
    grads = [t for t in needs if t.requires_grad]
    if not grads or not torch.is_grad_enabled():
        return output
    wrapped = _BeforeBackward.apply(callback, *grads)
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    by_id = {id(t): w for t, w in zip(grads, wrapped, strict=True)}
    return map_tensors(output, lambda t: by_id.get(id(t), t))


def install_module_hooks(
    root: nn.Module | None, units_of: dict[nn.Module, list[Unit]], coordinator: ParamCoordinator
) -> list[Any]:
    """Register the fetch/release hooks on every module that holds partitioned parameters; returns handles.

    ``root``'s forward starts a new iteration of the trace (None: add module hooks only)."""
    handles = [] if root is None else [root.register_forward_pre_hook(lambda m, a: coordinator.start_iteration())]
    for module, units in units_of.items():
        name = coordinator.module_names.get(module, type(module).__name__)

        def pre(m: nn.Module, args: Any, units: list[Unit] = units, name: str = name) -> None:
            coordinator.fetch(units, name, backward=False)

        def post(m: nn.Module, args: Any, output: Any, units: list[Unit] = units, name: str = name) -> Any:
            coordinator.after_forward(units)
            return _wrap_outputs(output, lambda: coordinator.fetch(units, name, backward=True))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles
