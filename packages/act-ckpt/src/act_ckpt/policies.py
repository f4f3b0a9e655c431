"""Selective checkpointing policies: which ops' outputs are saved and which are recomputed.

A policy is torch's ``policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy`` (see
``torch.utils.checkpoint.create_selective_checkpoint_contexts``); inside a checkpointed region
the outputs of ops it saves are kept until the backward, the rest is recomputed. Two ready ones:

* :func:`save_matmuls` — save the outputs of matrix multiplies (and fused attention), recompute
  the rest (norms, activations, softmax, dropout, adds): the expensive flops are not redone.
* :func:`recompute_attention_core` — Megatron's selective recomputation: save everything except
  the attention core (scores, softmax, attention dropout, scores x V), whose activations grow with
  the square of the sequence length but are cheap to recompute. Mark the core in your model with
  ``with act_ckpt.attention_core():`` (or the decorator form); fused attention ops
  (``scaled_dot_product_attention``) count as core without marking.

[Note: random ops are never cached by a policy]
An op whose output a policy caches is not run again in the recompute. For a random op that would
be wrong twice over: the recompute would draw nothing there, so every later random op would draw
from a shifted stream (masks different from the forward's: silently wrong gradients); and CPU
dropout is ``empty_like().bernoulli_().div_()``, in-place ops whose cached result torch's
selective checkpointing would return without writing it into the tensor the model goes on using.
:func:`rng_safe` (applied to every policy given to act-ckpt) therefore makes torch recompute every
op tagged ``nondeterministic_seeded`` (and every in-place op). Whether the recomputed random op
then draws again from the restored RNG state or writes back what the forward drew (its dropout
mask kept as ``bool``) is the Checkpointer's ``random_ops`` choice, made for all random ops of a
region at once: see [Note: random ops, redrawn or replayed] in :mod:`act_ckpt.random_ops`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy

__all__ = [
    "ATTENTION_OPS",
    "MATMUL_OPS",
    "POLICIES",
    "PolicyFn",
    "attention_core",
    "in_attention_core",
    "recompute_attention_core",
    "resolve_policy",
    "rng_safe",
    "save_matmuls",
    "save_ops",
]

PolicyFn = Callable[..., CheckpointPolicy]

_aten = torch.ops.aten


def _ops(names: Iterable[str]) -> frozenset[Any]:
    """The default overloads of the aten ops that exist in this torch build."""
    out = []
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            out.append(packet.default)
    return frozenset(out)


MATMUL_OPS = _ops(["mm", "addmm", "bmm", "baddbmm", "_scaled_mm"])
"""Matrix multiplies (``nn.Linear`` and ``@`` reach these at dispatch)."""

ATTENTION_OPS = _ops(
    [
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    ]
)
"""Fused attention kernels (``F.scaled_dot_product_attention`` reaches one of these)."""


def save_ops(ops: Iterable[Any]) -> PolicyFn:
    """A policy that saves the outputs of ``ops`` (aten OpOverloads) and recomputes the rest."""
    ops = frozenset(ops)
    for op in ops:
        if not isinstance(op, torch._ops.OpOverload):
            raise TypeError(f"save_ops: expected aten OpOverloads such as torch.ops.aten.mm.default, got {op!r}")

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def save_matmuls(extra_ops: Iterable[Any] = (), *, include_attention: bool = True) -> PolicyFn:
    """Save matmul outputs (and fused attention's, unless ``include_attention=False``); recompute the rest."""
    ops = set(MATMUL_OPS) | set(extra_ops)
    if include_attention:
        ops |= ATTENTION_OPS
    return save_ops(ops)


# Depth of `attention_core()` blocks entered on this thread (the forward and its recompute both
# run the model's code, so the marker is seen at both; only the forward's decision matters).
_CORE = threading.local()


@contextlib.contextmanager
def _attention_core() -> Iterator[None]:
    _CORE.depth = getattr(_CORE, "depth", 0) + 1
    try:
        yield
    finally:
        _CORE.depth -= 1


def attention_core() -> contextlib.AbstractContextManager[None]:
    """Mark the attention core: ``with attention_core(): ...`` or ``@attention_core()`` on a function.

    Ops run inside are what :func:`recompute_attention_core` recomputes; outside any
    checkpointed region the marker does nothing.
    """
    return _attention_core()


def in_attention_core() -> bool:
    """True inside an :func:`attention_core` block on this thread."""
    return getattr(_CORE, "depth", 0) > 0


def _worth_saving(op: Any, args: tuple[Any, ...]) -> bool:
    """Ops whose outputs are worth caching: they compute from tensor inputs and make new memory.

    Views cost nothing to recompute (and their base is what is saved); factory ops (``empty_like``,
    ``ones``) have no tensor inputs, cost little, and their outputs are often filled in place
    afterwards, which a cached copy forbids.
    """
    if getattr(op, "is_view", False):
        return False
    name = op._schema.name if hasattr(op, "_schema") else ""
    if "empty" in name or name.endswith("_like") or name.startswith("aten::new_"):
        return False  # allocations shaped like an input (empty_like, zeros_like, new_zeros, ...)
    return any(isinstance(a, torch.Tensor) for a in args)


def recompute_attention_core(core_ops: Iterable[Any] = ATTENTION_OPS) -> PolicyFn:
    """Recompute the attention core (ops inside :func:`attention_core`, and ``core_ops``); save the rest.

    "The rest" is every op that computes a new tensor from tensor inputs except pointwise ones
    (matmuls, norms, copies; not views, factory or pointwise ops, which are cheap to redo; random
    and in-place ops are always recomputed). Models that modify a saved op's output
    in place (``nn.ReLU(inplace=True)``) make torch refuse the cached value: use
    :func:`save_matmuls` there.
    """
    core = frozenset(core_ops)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in core or in_attention_core() or not _worth_saving(op, args):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if torch.Tag.pointwise in op.tags:
            # Adds, activations, dropout's scaling: cheap to redo from the saved matmul outputs, and
            # saving their outputs would keep tensors the no-checkpoint graph does not keep.
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.PREFER_SAVE

    return policy


def _always_recomputed(op: Any) -> bool:
    """Ops no policy may save: random ones and ones that mutate (see :func:`rng_safe`)."""
    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return True
    schema = getattr(op, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def rng_safe(policy: PolicyFn) -> PolicyFn:
    """``policy`` with every random op and every in-place op recomputed.

    Random ops: see [Note: random ops are never cached by a policy]. In-place ops: a cached in-place op
    would be skipped in the recompute, leaving its target unmodified there (CPU dropout is
    ``empty_like().bernoulli_().div_()``: a saved ``div_`` would leave the recomputed mask unscaled).
    """

    def safe(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if _always_recomputed(op):
            return CheckpointPolicy.MUST_RECOMPUTE
        decision = policy(ctx, op, *args, **kwargs)
        if isinstance(decision, bool):  # torch accepts True/False for save/recompute
            decision = CheckpointPolicy.MUST_SAVE if decision else CheckpointPolicy.PREFER_RECOMPUTE
        return decision

    safe.__wrapped__ = policy  # type: ignore[attr-defined]
    return safe


POLICIES: dict[str, Callable[[], PolicyFn]] = {
    "save_matmuls": save_matmuls,
    "recompute_attention_core": recompute_attention_core,
}
"""Ready policies by name (what :func:`resolve_policy` accepts as a string)."""


def resolve_policy(policy: str | PolicyFn | Iterable[Any] | None) -> PolicyFn | None:
    """A policy function from a name, a policy function, or a list of ops to save; None = full checkpointing."""
    if policy is None:
        return None
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown checkpoint policy {policy!r}; accepted: {', '.join(POLICIES)} or a function")
        return rng_safe(POLICIES[policy]())
    if callable(policy):
        return rng_safe(policy)
    try:
        ops = list(policy)
    except TypeError:
        raise TypeError(
            f"policy must be None, a name ({', '.join(POLICIES)}), a policy function or a list of ops, "
            f"got {type(policy).__name__}"
        ) from None
    return rng_safe(save_ops(ops))
