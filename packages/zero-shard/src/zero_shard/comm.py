"""Which collective moves gradients and parameters, per backend, and the parameter all-gather after a step.

[Note: the textbook collective is not always the fast one] ZeRO's textbook pattern is reduce-scatter for
gradients and all-gather for parameters: each moves half the bytes of an all-reduce. On NCCL that wins.
On gloo (CPU) we measured otherwise, ranks on one machine, 33.7M fp32 (135 MB):

- gradients: ``all_reduce`` of 16M fp32 at ~0.94-1.49 GB/s bus bandwidth, ``reduce_scatter_tensor``
  ~0.28-0.56, ``reduce`` to the owner ~1.31: an all-reduce of the whole bucket (keeping only this
  rank's slice) is the fast choice;
- parameters (filling the other ranks' partitions of a 135 MB flat buffer): one broadcast per owner,
  all launched at once, 38 ms at 2 ranks / 89 ms at 4; an all-reduce of a buffer zeroed outside this
  rank's partition 86 / 219 ms; ``all_gather_into_tensor`` 182 / 281 ms. A broadcast only copies, where
  the all-reduce also sends and sums the zeros.

The choice is made here, per backend, and ``benchmarks/zero_step.py`` re-measures it side by side.
Every option gives the same values: sums of the same operands (x + 0 is exact) or plain copies, so
switching changes speed, not results (except that the all-reduce-based gather turns a parameter that is
exactly -0.0 into +0.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["CollectiveChoice", "all_gather_single", "choose_collectives", "gather_partitions", "launch_gather"]

GradCollective = Literal["all_reduce", "reduce"]
ParamCollective = Literal["all_reduce", "all_gather", "broadcast"]

# Backends whose all-reduce we measured to beat reduce-scatter / all-gather (see the note above).
_ALL_REDUCE_BACKENDS = {"gloo"}


@dataclass(frozen=True)
class CollectiveChoice:
    """How gradients are reduced (``grad``) and updated partitions are shared (``param``).

    ``grad``: ``all_reduce`` (every rank gets the whole reduced bucket) or ``reduce`` (each slice of the
    bucket is reduced onto the rank that owns it; stages 1-2 only). ``param``: ``all_gather``,
    ``all_reduce`` (of a buffer zeroed outside this rank's partition) or ``broadcast`` (one broadcast per
    owner, DeepSpeed's ``allgather_partitions: false``).
    """

    grad: GradCollective = "all_reduce"
    param: ParamCollective = "all_gather"


def choose_collectives(
    backend: str, stage: int, *, reduce_scatter: bool, allgather_partitions: bool
) -> CollectiveChoice:
    """The collectives for ``backend`` and the config's ``reduce_scatter``/``allgather_partitions`` keys."""
    fast_all_reduce = backend in _ALL_REDUCE_BACKENDS
    if stage == 0 or not reduce_scatter or fast_all_reduce:
        grad: GradCollective = "all_reduce"
    else:
        grad = "reduce"
    # gloo: broadcasts from the owners beat both all-gather and an all-reduce-based gather (see the note).
    param: ParamCollective = "broadcast" if not allgather_partitions or fast_all_reduce else "all_gather"
    return CollectiveChoice(grad=grad, param=param)


def all_gather_single(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None, *, async_op: bool = False
) -> dist.Work | None:
    """All-gather ``inp`` of every rank into ``out``, rank order (one collective)."""
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; keep working on older releases.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def gather_partitions(
    flat: torch.Tensor,
    partition_numel: int,
    rank: int,
    world_size: int,
    *,
    method: ParamCollective,
    bucket_numel: int,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Fill every rank's partition of ``flat`` from its owner; ``flat``'s own partition is already current.

    Works in pieces of about ``bucket_numel`` elements (``allgather_bucket_size``) to bound the temporary
    memory and message size.
    """
    if world_size == 1:
        return
    P = partition_numel
    chunk = max(1, bucket_numel)
    step = max(1, bucket_numel // world_size)
    if method == "broadcast":
        # All launched before any is waited on: the backend runs them concurrently (measured 5-15% faster
        # than one after the other on gloo).
        works = []
        for r in range(world_size):
            src = r if group is None else dist.get_global_rank(group, r)
            for a in range(0, P, chunk):
                b = min(P, a + chunk)
                works.append(dist.broadcast(flat[r * P + a : r * P + b], src=src, group=group, async_op=True))
        for w in works:
            w.wait()
    elif method == "all_gather":
        if step >= P:
            # One collective straight into the flat buffer (input copied: in-place aliasing is backend-specific).
            all_gather_single(flat, flat[rank * P : (rank + 1) * P].clone(), group)
            return
        for a in range(0, P, step):
            b = min(P, a + step)
            outs = [flat[r * P + a : r * P + b] for r in range(world_size)]
            dist.all_gather(outs, flat[rank * P + a : rank * P + b].clone(), group=group)
    elif method == "all_reduce":
        lo, hi = rank * P, (rank + 1) * P
        total = flat.numel()
        for a in range(0, total, chunk):
            b = min(total, a + chunk)
            piece = flat[a:b]
            # Zero what other ranks own; their values arrive as x + 0 + ... + 0, which is exact.
            if a < lo:
                flat[a : min(b, lo)].zero_()
            if b > hi:
                flat[max(a, hi) : b].zero_()
            dist.all_reduce(piece, group=group)
    else:
        raise ValueError(f"unknown parameter collective {method!r}; accepted: all_gather, all_reduce, broadcast")


def launch_gather(
    flat: torch.Tensor,
    partition_numel: int,
    rank: int,
    world_size: int,
    *,
    method: ParamCollective,
    group: dist.ProcessGroup | None = None,
) -> list:
    """Start filling every rank's partition of ``flat`` from its owner, asynchronously; returns the works.

    The stage-3 fetch (:mod:`zero_shard.partition`): one collective per owner (broadcast) or one
    all-gather, not waited on, so that a prefetch overlaps with compute. ``flat``'s own partition must
    already hold this rank's values. Wait on every returned work before reading ``flat``. The returned
    list also holds the all-gather's input copy, which must stay alive until the works complete.
    """
    if world_size == 1:
        return []
    P = partition_numel
    if method == "broadcast":
        return [
            dist.broadcast(
                flat[r * P : (r + 1) * P],
                src=r if group is None else dist.get_global_rank(group, r),
                group=group,
                async_op=True,
            )
            for r in range(world_size)
        ]
    # all_gather (and all_reduce, which has no advantage for a fetch): one collective into the buffer.
    mine = flat[rank * P : (rank + 1) * P].clone()
    return [all_gather_single(flat, mine, group, async_op=True), mine]
