"""The communication of tensor and sequence parallelism as autograd functions (Megatron's mappings).

Each function is one collective in forward and its transpose in backward:

=========================================  ==========================  ==========================
function                                   forward                     backward
=========================================  ==========================  ==========================
:func:`copy_to_tensor_parallel_region`     identity                    all-reduce
:func:`reduce_from_tensor_parallel_region` all-reduce                  identity
:func:`scatter_to_tensor_parallel_region`  keep my slice of last dim   all-gather last dim
:func:`gather_from_tensor_parallel_region` all-gather last dim         keep my slice
:func:`scatter_to_sequence_parallel_region` keep my slice of seq dim   all-gather seq dim
:func:`gather_from_sequence_parallel_region` all-gather seq dim        reduce-scatter seq dim
:func:`reduce_scatter_to_sequence_parallel_region` reduce-scatter seq  all-gather seq dim
=========================================  ==========================  ==========================

Activations are batch-first ``[batch, seq, hidden]`` (torch's convention), so the sequence
dimension is 1 (Megatron's layout is ``[seq, batch, hidden]``, dimension 0). ``group=None`` is the
default process group; with one rank (or without torch.distributed) every function is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "SEQ_DIM",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "tp_rank",
    "tp_world_size",
]

SEQ_DIM = 1


def tp_world_size(group: Any = None) -> int:
    """Ranks in the tensor-parallel group (1 without torch.distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def tp_rank(group: Any = None) -> int:
    """This rank's index in the tensor-parallel group."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if tp_world_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    n = tp_world_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n != 0:
        raise ValueError(f"tensor parallel: dimension {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[tp_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    n = tp_world_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    n = tp_world_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n != 0:
        raise ValueError(f"sequence parallel: dimension {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    # Reduce-scatter along `dim` as an all-reduce of the whole then a slice: gloo has no
    # reduce_scatter; the numbers are the same (each element is the same sum).
    if dist.get_backend(group) == "nccl":
        parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=group)
        return out
    return _split(_all_reduce(x, group), dim, group)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        return _all_reduce(g, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        return _gather(g, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, reduce_grad: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        if ctx.reduce_grad:
            return _reduce_scatter(g, ctx.dim, ctx.group), None, None, None
        return _split(g, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        return _gather(g, ctx.dim, ctx.group), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Enter a parallel region with a replicated input: identity forward, all-reduce of the gradient."""
    return _Copy.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Leave a parallel region by summing the partial results: all-reduce forward, identity backward."""
    return _Reduce.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Keep this rank's slice of the last dimension (the gradient is all-gathered)."""
    return _Scatter.apply(x, -1, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-gather the last dimension (the gradient is sliced back)."""
    return _Gather.apply(x, -1, group, False)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Keep this rank's part of the sequence (the gradient is all-gathered)."""
    return _Scatter.apply(x, SEQ_DIM, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-gather the sequence before a column-parallel layer; the gradient is reduce-scattered."""
    return _Gather.apply(x, SEQ_DIM, group, True)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs and keep this rank's part of the sequence."""
    return _ReduceScatter.apply(x, SEQ_DIM, group)
