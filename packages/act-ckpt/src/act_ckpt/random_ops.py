"""Random ops in a checkpointed region: redrawn in the recompute, or replayed from what the forward drew.

[Note: random ops, redrawn or replayed]
A recompute must see the random numbers the forward drew (dropout masks), or its gradients are
silently wrong. Two ways get there, chosen per region with ``random_ops=``:

* ``"recompute"``: the recompute runs every random op again from the RNG state restored at its
  start (torch's ``preserve_rng_state``, and act-ckpt's RNG tracker), so it draws the same numbers.
  Costs nothing in memory; costs drawing the numbers twice. On CPU that is expensive: dropout's
  ``bernoulli_`` was ~15% of a transformer block's forward+backward in our profile, and more than
  half of what a selective recompute added; CUDA's fused dropout kernel is cheap.
* ``"replay"``: the forward keeps what every random op produced (:class:`RecordRandom`) and the
  recompute writes it back instead of drawing (:class:`ReplayRandom`). ``bernoulli`` results (the
  0/1 dropout masks of CPU dropout, ``empty_like(x).bernoulli_(1 - p)``) are kept as ``bool``, one
  byte per element, and written back exactly; any other random op's results are kept in full.

Either way it is ALL random ops of a region or none: if one were replayed and a later one redrawn,
the later one would draw from a shifted stream (the replayed op draws nothing in the recompute).
That is also why selective policies cannot simply "save" a random op: see
[Note: random ops are never cached by a policy] in :mod:`act_ckpt.policies`.

The two modes are ``TorchDispatchMode``s entered with torch's selective-checkpointing modes in the
``context_fn`` contexts, *below* them: torch's caching mode sees every op first (its policy always
says "recompute" for random ops) and passes it down to these, so the ops they run themselves (the
``bool`` copies) are invisible to its op-by-op bookkeeping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["RANDOM_OPS", "RandomStore", "RecordRandom", "ReplayRandom", "is_random_op"]

RANDOM_OPS = ("recompute", "replay")
"""Accepted values of ``random_ops`` (``"auto"`` picks one: see ``Checkpointer``)."""

_NONDETERMINISTIC_SEEDED = torch.Tag.nondeterministic_seeded


def is_random_op(func: Any) -> bool:
    """True for ops that draw from a random generator (tag ``nondeterministic_seeded``)."""
    return _NONDETERMINISTIC_SEEDED in getattr(func, "tags", ())


def _zero_one_valued(func: Any) -> bool:
    # Every bernoulli overload writes only 0 and 1: exact as bool, 1 byte instead of 4.
    return func._schema.name in ("aten::bernoulli", "aten::bernoulli_")


def _written_args(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Any, torch.Tensor]]:
    """The (alias set, tensor) of every argument the op writes to (``self`` of in-place ops, ``out=``)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        if isinstance(value, torch.Tensor):
            written.append((frozenset(info.before_set), value))
    return written


class _Snapshot:
    """One kept tensor: ``bool`` for 0/1-valued results, else a copy (it may be modified in place later)."""

    __slots__ = ("dtype", "value")

    def __init__(self, t: torch.Tensor, zero_one: bool) -> None:
        self.dtype = t.dtype
        self.value = t.to(torch.bool) if zero_one and t.dtype != torch.bool else t.clone()

    def restore(self) -> torch.Tensor:
        return self.value if self.value.dtype == self.dtype else self.value.to(self.dtype)


class RandomStore:
    """What one region's random ops produced in the forward, in call order, until the recompute replays it."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, list[_Snapshot], list[Any]]] = []

    def tensors(self) -> list[torch.Tensor]:
        """The kept tensors (what a :class:`~act_ckpt.SavedActivationMeter` counts)."""
        out = []
        for _, written, results in self.entries:
            for snap in [*written, *results]:
                if isinstance(snap, _Snapshot):
                    out.append(snap.value)
        return out


class RecordRandom(TorchDispatchMode):
    """Forward side of ``random_ops="replay"``: run every op, keep what random ops produced."""

    def __init__(self, store: RandomStore) -> None:
        super().__init__()
        self.store = store

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if is_random_op(func):
            zero_one = _zero_one_valued(func)
            written = [_Snapshot(t, zero_one) for _, t in _written_args(func, args, kwargs)]
            # Results that alias a written argument (in-place, out=) are rebuilt from it at replay;
            # only fresh results are kept.
            fresh = [r.alias_info is None for r in func._schema.returns]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            results = [
                _Snapshot(o, zero_one) if is_fresh and isinstance(o, torch.Tensor) else None
                for is_fresh, o in zip(fresh, outs, strict=False)
            ]
            self.store.entries.append((func, written, results))
        return out


class ReplayRandom(TorchDispatchMode):
    """Recompute side of ``random_ops="replay"``: random ops write back what the forward drew.

    The store is emptied when the recompute ends (as torch's selective checkpointing consumes
    its cache): a region with replayed random ops can be backpropagated once.
    """

    def __init__(self, store: RandomStore) -> None:
        super().__init__()
        self.store = store
        self.index = 0

    def __enter__(self) -> ReplayRandom:
        self.index = 0
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.store.entries.clear()  # the recompute is over (or stopped early): nothing is needed again
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not is_random_op(func):
            return func(*args, **kwargs)
        if self.index >= len(self.store.entries):
            raise RuntimeError(
                f"act_ckpt: random op {func} in the recompute has nothing to replay: the region ran "
                "different random ops than in the forward, or is backpropagated a second time "
                "(random_ops='replay' allows one backward; use random_ops='recompute' for retain_graph)"
            )
        recorded, written, results = self.store.entries[self.index]
        self.index += 1
        if recorded is not func:
            raise RuntimeError(
                f"act_ckpt: the recompute ran {func} where the forward ran {recorded}: the region's "
                "random ops must run in the same order in the forward and the recompute"
            )
        by_alias = {}
        for (alias, target), snap in zip(_written_args(func, args, kwargs), written, strict=True):
            target.copy_(snap.value)  # bool -> float writes exact 0./1.
            by_alias[alias] = target
        outs = []
        for ret, snap in zip(func._schema.returns, results, strict=True):
            if ret.alias_info is not None:
                outs.append(by_alias[frozenset(ret.alias_info.before_set)])
            else:
                outs.append(snap.restore() if snap is not None else None)
        return outs[0] if len(outs) == 1 else tuple(outs)
