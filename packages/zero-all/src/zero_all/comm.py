"""``zero_all.comm``: DeepSpeed's ``deepspeed.comm`` names over ``torch.distributed``.

Scripts written for DeepSpeed do ``from deepspeed import comm as dist`` and then call
``dist.get_rank()``, ``dist.all_reduce(t)``, ``dist.barrier()``... With zero-all,
``from zero_all import comm as dist`` gives the same functions with DeepSpeed's argument names
and defaults. Each is a thin call into torch.distributed (there is no second communication
layer, ARCHITECTURE.md), with two differences of substance:

- before the process group exists every query and collective raises ``RuntimeError`` naming the
  operation (DeepSpeed asserts "DeepSpeed backend not set"), except :func:`is_initialized`,
  :func:`is_available` and :func:`get_local_rank`, which read the environment as DeepSpeed does;
- ``ReduceOp.AVG`` works on gloo too (gloo has no AVG: it is a SUM divided by the group size,
  for floating-point tensors).

DeepSpeed's comms-logger keywords (``prof``, ``log_name``, ``debug``) are accepted and ignored:
zero-all has no comms logger (``log_summary`` prints that). ``all_reduce`` etc. return what torch
returns: a work handle with ``async_op=True``, else None.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from zero_all.distributed import init_distributed

__all__ = [
    "ReduceOp",
    "all_gather",
    "all_gather_coalesced",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_reduce_coalesced",
    "all_to_all",
    "all_to_all_single",
    "allgather_fn",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "destroy_process_group",
    "gather",
    "get_all_ranks_from_group",
    "get_global_rank",
    "get_local_rank",
    "get_rank",
    "get_world_group",
    "get_world_size",
    "has_all_gather_into_tensor",
    "has_all_reduce_coalesced",
    "has_coalescing_manager",
    "has_reduce_scatter_tensor",
    "inference_all_reduce",
    "init_distributed",
    "irecv",
    "is_available",
    "is_initialized",
    "isend",
    "log_summary",
    "monitored_barrier",
    "new_group",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_fn",
    "reduce_scatter_tensor",
    "scatter",
    "send",
]

ReduceOp = dist.ReduceOp
"""torch's reduce ops (SUM, PRODUCT, MIN, MAX, BAND, BOR, BXOR, AVG), as ``deepspeed.comm.ReduceOp``."""

_LOGGER_KWARGS = frozenset({"prof", "log_name", "debug"})
F = TypeVar("F", bound=Callable[..., Any])


def _op(func: F) -> F:
    """Drop DeepSpeed's comms-logger keywords and fail clearly before the process group exists."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for key in _LOGGER_KWARGS & kwargs.keys():
            del kwargs[key]
        _require(func.__name__)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _require(name: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"zero_all.comm.{name}: torch.distributed is not initialized; call zero_all.init_distributed() "
            "(zero_all.initialize() does) first"
        )


def _needs_avg_emulation(op: Any, group: Any) -> bool:
    return op == ReduceOp.AVG and dist.get_backend(group) == "gloo"


def _divide(tensor: torch.Tensor, group: Any) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"ReduceOp.AVG on gloo needs a floating-point tensor, got {tensor.dtype}")
    tensor.div_(dist.get_world_size(group))


class _AfterWork:
    """A work handle that runs ``then`` once the collective has finished (AVG's division on gloo)."""

    def __init__(self, work: Any, then: Callable[[], None]) -> None:
        self._work, self._then, self._done = work, then, False

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Wait for the collective, then finish the emulated op."""
        ok = self._work.wait() if timeout is None else self._work.wait(timeout)
        if not self._done:
            self._then()
            self._done = True
        return ok

    def is_completed(self) -> bool:
        """Whether the collective (and the finishing step) are done."""
        if not self._done and self._work.is_completed():
            self.wait()
        return self._done


def _reduce_call(fn: Callable[..., Any], out: torch.Tensor, op: Any, group: Any, async_op: bool, **kw: Any) -> Any:
    if not _needs_avg_emulation(op, group):
        return fn(op=op, group=group, async_op=async_op, **kw)
    work = fn(op=ReduceOp.SUM, group=group, async_op=async_op, **kw)
    if async_op:
        return _AfterWork(work, lambda: _divide(out, group))
    _divide(out, group)
    return None


# ---------------------------------------------------------------- state and groups


def is_available() -> bool:
    """Whether torch.distributed is built in."""
    return dist.is_available()


def is_initialized() -> bool:
    """Whether the default process group exists."""
    return dist.is_available() and dist.is_initialized()


@_op
def destroy_process_group(group: Any = None) -> None:
    """Destroy ``group`` (default: the default group and every other)."""
    dist.destroy_process_group(group)


@_op
def new_group(ranks: list[int]) -> Any:
    """A new group of ``ranks`` (every rank of the default group must call it)."""
    return dist.new_group(ranks)


@_op
def get_world_group() -> Any:
    """The default (world) process group."""
    return dist.group.WORLD


@_op
def get_world_size(group: Any = None) -> int:
    """Ranks in ``group`` (default: all); -1 when this rank is not in it."""
    return dist.get_world_size(group)


@_op
def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the global rank); -1 when not in it."""
    return dist.get_rank(group)


def get_local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK``, else Open MPI's local rank, else 0 (as DeepSpeed)."""
    value = os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    return int(value)


@_op
def get_global_rank(group: Any = None, group_rank: int = 0) -> int:
    """The global rank of ``group_rank`` in ``group``."""
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, group_rank)


@_op
def get_all_ranks_from_group(group: Any = None) -> list[int]:
    """The global ranks of every member of ``group``, in group-rank order."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def has_all_gather_into_tensor() -> bool:
    """True: torch has ``all_gather_into_tensor``."""
    return hasattr(dist, "all_gather_into_tensor")


def has_reduce_scatter_tensor() -> bool:
    """True: torch has ``reduce_scatter_tensor``."""
    return hasattr(dist, "reduce_scatter_tensor")


def has_all_reduce_coalesced() -> bool:
    """Whether torch has ``all_reduce_coalesced``."""
    return hasattr(dist, "all_reduce_coalesced")


def has_coalescing_manager() -> bool:
    """Whether torch has the coalescing manager."""
    return hasattr(dist, "_coalescing_manager")


def log_summary(show_straggler: bool = False, return_dict: bool = False) -> dict[str, Any] | None:
    """DeepSpeed's comms-logger summary: zero-all logs no collectives, so there is nothing to show."""
    if return_dict:
        return {}
    if is_initialized() and dist.get_rank() == 0:
        print("zero_all.comm: no comms logger (collectives are not timed)")
    return None


# ---------------------------------------------------------------- collectives


@_op
def all_reduce(tensor: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False) -> Any:
    """Reduce ``tensor`` in place over ``group``."""
    return _reduce_call(dist.all_reduce, tensor, op, group, async_op, tensor=tensor)


@_op
def inference_all_reduce(
    tensor: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> torch.Tensor:
    """All-reduce in place and wait (DeepSpeed's low-latency inference path); returns ``tensor``."""
    if dist.get_world_size(group) > 1:
        all_reduce(tensor, op=op, group=group)
    return tensor


@_op
def all_reduce_coalesced(
    tensors: list[torch.Tensor], op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> Any:
    """All-reduce each tensor of the list in place (one flat collective)."""
    if not tensors:
        return None
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce(flat, op=op, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return None


@_op
def reduce(tensor: torch.Tensor, dst: int, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False) -> Any:
    """Reduce ``tensor`` onto global rank ``dst``."""
    if _needs_avg_emulation(op, group):
        work = dist.reduce(tensor, dst, op=ReduceOp.SUM, group=group, async_op=async_op)
        if dist.get_rank() != dst:
            return work
        if async_op:
            return _AfterWork(work, lambda: _divide(tensor, group))
        _divide(tensor, group)
        return None
    return dist.reduce(tensor, dst, op=op, group=group, async_op=async_op)


@_op
def reduce_scatter_tensor(
    output_tensor: torch.Tensor,
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Reduce ``tensor`` (group size × output numel) and keep this rank's slice in ``output_tensor``."""
    return _reduce_call(
        dist.reduce_scatter_tensor, output_tensor, op, group, async_op, output=output_tensor, input=tensor
    )


reduce_scatter_fn = reduce_scatter_tensor
"""DeepSpeed's older name of :func:`reduce_scatter_tensor`."""


@_op
def reduce_scatter(
    output: torch.Tensor,
    input_list: list[torch.Tensor],
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Reduce the i-th tensor of every rank's ``input_list`` onto rank i's ``output``."""
    if dist.get_backend(group) == "gloo":
        # gloo has no list reduce-scatter: one flat reduce_scatter_tensor over the concatenated list.
        flat = torch.cat([t.reshape(-1) for t in input_list])
        return reduce_scatter_tensor(output.view(-1), flat, op=op, group=group, async_op=async_op)
    return _reduce_call(dist.reduce_scatter, output, op, group, async_op, output=output, input_list=input_list)


@_op
def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    """Gather every rank's ``tensor`` into ``tensor_list``."""
    return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


@_op
def all_gather_into_tensor(
    output_tensor: torch.Tensor, tensor: torch.Tensor, group: Any = None, async_op: bool = False
) -> Any:
    """Gather every rank's ``tensor`` into one ``output_tensor`` (rank order)."""
    return dist.all_gather_into_tensor(output_tensor, tensor, group=group, async_op=async_op)


@_op
def allgather_fn(
    output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any = None, async_op: bool = False
) -> Any:
    """DeepSpeed's older name of :func:`all_gather_into_tensor`."""
    return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


@_op
def all_gather_coalesced(
    output_tensors: list[list[torch.Tensor]],
    input_tensors: list[torch.Tensor],
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """``all_gather`` of each input tensor into the matching output list."""
    works = [
        dist.all_gather(out, inp, group=group, async_op=async_op)
        for out, inp in zip(output_tensors, input_tensors, strict=True)
    ]
    return works[-1] if async_op and works else None


@_op
def all_gather_object(object_list: list[Any], obj: Any, group: Any = None) -> None:
    """Gather a picklable object from every rank (uses pickle: only between trusted ranks)."""
    dist.all_gather_object(object_list, obj, group=group)


@_op
def broadcast(tensor: torch.Tensor, src: int, group: Any = None, async_op: bool = False) -> Any:
    """Copy global rank ``src``'s ``tensor`` to every rank."""
    return dist.broadcast(tensor, src, group=group, async_op=async_op)


@_op
def broadcast_object_list(object_list: list[Any], src: int, group: Any = None, device: Any = None) -> None:
    """Broadcast picklable objects from ``src``."""
    dist.broadcast_object_list(object_list, src, group=group, device=device)


@_op
def gather(
    tensor: torch.Tensor,
    gather_list: list[torch.Tensor] | None = None,
    dst: int = 0,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Gather every rank's ``tensor`` into ``gather_list`` on ``dst``."""
    return dist.gather(tensor, gather_list, dst, group=group, async_op=async_op)


@_op
def scatter(
    tensor: torch.Tensor,
    scatter_list: list[torch.Tensor] | None = None,
    src: int = 0,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Scatter ``scatter_list`` from ``src``: rank i receives element i into ``tensor``."""
    return dist.scatter(tensor, scatter_list, src, group=group, async_op=async_op)


@_op
def all_to_all_single(
    output: torch.Tensor,
    tensor: torch.Tensor,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """Split ``tensor``, send piece i to rank i, concatenate what arrives into ``output``."""
    return dist.all_to_all_single(output, tensor, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


@_op
def all_to_all(
    output_tensor_list: list[torch.Tensor],
    input_tensor_list: list[torch.Tensor],
    group: Any = None,
    async_op: bool = False,
) -> Any:
    """List form of :func:`all_to_all_single`."""
    return dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)


@_op
def send(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0) -> None:
    """Blocking point-to-point send to global rank ``dst``."""
    dist.send(tensor, dst, group=group, tag=tag)


@_op
def recv(tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0) -> int:
    """Blocking receive into ``tensor`` (from any rank when ``src`` is None); returns the sender."""
    return dist.recv(tensor, src, group=group, tag=tag)


@_op
def isend(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0) -> Any:
    """Non-blocking send; returns a work handle."""
    return dist.isend(tensor, dst, group=group, tag=tag)


@_op
def irecv(tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0) -> Any:
    """Non-blocking receive; returns a work handle."""
    return dist.irecv(tensor, src, group=group, tag=tag)


@_op
def barrier(group: Any = None, async_op: bool = False, device_ids: list[int] | None = None) -> Any:
    """Wait until every rank of ``group`` reaches this point."""
    if device_ids is not None and dist.get_backend(group) == "nccl":
        return dist.barrier(group=group, async_op=async_op, device_ids=device_ids)
    return dist.barrier(group=group, async_op=async_op)


@_op
def monitored_barrier(group: Any = None, timeout: timedelta | None = None, wait_all_ranks: bool = False) -> None:
    """A barrier that names the ranks that did not arrive within ``timeout`` (gloo only, as in torch)."""
    dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)
