"""Checkpointing modules: wrap one block, or every N-th block of a model, in place.

The module keeps its identity, its parameters' names and its state_dict keys: act-ckpt swaps the
instance's class for a subclass whose ``forward`` runs the original one checkpointed (the way
FSDP2's ``fully_shard`` extends a module), rather than nesting it in a wrapper module that would
rename every parameter (``block.module.weight``). Hooks registered on the module run outside
the checkpointed region, as with any module call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn

from act_ckpt.core import Checkpointer, get_checkpointer

__all__ = ["CheckpointedModule", "apply_activation_checkpointing", "checkpoint_wrapper", "unwrap"]

M = TypeVar("M", bound=nn.Module)

_CLASSES: dict[type, type] = {}


class CheckpointedModule:
    """Mixin of checkpointed modules: ``forward`` runs the module's own forward checkpointed.

    ``isinstance(m, CheckpointedModule)`` tells whether a module is wrapped. The Checkpointer is
    the one given to :func:`checkpoint_wrapper`, or else the process-wide default *at call time*
    (so :func:`act_ckpt.configure` after wrapping takes effect).
    """

    _act_ckpt_checkpointer: Checkpointer | None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ckpt = self._act_ckpt_checkpointer or get_checkpointer()
        return ckpt(super().forward, *args, **kwargs)  # type: ignore[misc]


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (CheckpointedModule, cls), {})
    return _CLASSES[cls]


def checkpoint_wrapper(
    module: M, checkpointer: Checkpointer | None = None, *, policy: Any | None = None, **options: Any
) -> M:
    """Make ``module``'s forward checkpointed, in place; returns the same module.

    ``checkpointer`` (or ``policy=`` and other :class:`Checkpointer` options to build one) sets
    how; with neither, the process-wide default is used. Wrapping twice only updates the settings.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"checkpoint_wrapper expects an nn.Module, got {type(module).__name__}")
    if checkpointer is not None and (policy is not None or options):
        raise ValueError("give either a Checkpointer or policy=/options, not both")
    if checkpointer is None and (policy is not None or options):
        checkpointer = Checkpointer(policy=policy, **options)
    if not isinstance(module, CheckpointedModule):
        module.__class__ = _checkpointed_class(type(module))
    # object.__setattr__: a plain attribute, not registered as a submodule or parameter.
    object.__setattr__(module, "_act_ckpt_checkpointer", checkpointer)
    return module


def unwrap(module: M) -> M:
    """Undo :func:`checkpoint_wrapper` (in place); a module that is not wrapped is returned as is."""
    if isinstance(module, CheckpointedModule):
        module.__class__ = type(module).__bases__[1]  # Checkpointed<cls>(CheckpointedModule, cls)
        del module.__dict__["_act_ckpt_checkpointer"]
    return module


def _default_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of the ModuleList/Sequential holding the most parameters: the model's stack of blocks."""
    best: tuple[int, int, str, nn.Module] | None = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
            key = (sum(p.numel() for p in m.parameters()), len(m), name, m)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is None:
        raise ValueError(
            "apply_activation_checkpointing: the model has no nn.ModuleList/nn.Sequential of blocks; "
            "pass block_types=(YourBlock,) or a predicate"
        )
    prefix = f"{best[2]}." if best[2] else ""
    return [(f"{prefix}{n}", c) for n, c in best[3].named_children()]


def apply_activation_checkpointing(
    model: nn.Module,
    every: int = 1,
    *,
    block_types: Iterable[type] | Callable[[str, nn.Module], bool] | None = None,
    checkpointer: Checkpointer | None = None,
    policy: Any | None = None,
    **options: Any,
) -> list[str]:
    """Checkpoint every ``every``-th block of ``model`` (the 1st, the (1+every)-th, ...); returns their names.

    Blocks are the modules of ``block_types`` (classes, or a ``(name, module) -> bool``
    predicate), outermost matches only, in model order; by default the children of the
    ``nn.ModuleList``/``nn.Sequential`` that holds the most parameters (GPT's ``transformer.h``, ...).
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    if block_types is None:
        blocks = _default_blocks(model)
    else:
        if callable(block_types) and not isinstance(block_types, type):
            match = block_types
        else:
            types = tuple(block_types)  # type: ignore[arg-type]
            if not types or not all(isinstance(t, type) for t in types):
                raise TypeError("block_types must be module classes or a (name, module) -> bool predicate")

            def match(name: str, m: nn.Module) -> bool:
                return isinstance(m, types)

        blocks = []
        for name, m in model.named_modules():
            if match(name, m) and not any(name.startswith(f"{b}.") for b, _ in blocks):
                blocks.append((name, m))
        if not blocks:
            raise ValueError("apply_activation_checkpointing: no module matched block_types")
    chosen = blocks[::every]
    for _, m in chosen:
        checkpoint_wrapper(m, checkpointer, policy=policy, **options)
    return [name for name, _ in chosen]
