"""The few torch.distributed helpers the scalers need: which group, which device, one flag.

Convention (torch's): ``process_group=None`` means the default group when torch.distributed
is initialized, and this process alone when it is not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup | None; kept loose so type checkers on CPU builds are happy

__all__ = ["ProcessGroup", "all_reduce_max_flag", "group_size", "reduce_device"]


def group_size(process_group: ProcessGroup) -> int:
    """Number of ranks in the group (1 when torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def reduce_device(process_group: ProcessGroup, like: torch.Tensor | None = None) -> torch.device:
    """Where a small tensor for a collective on this group must live.

    NCCL (and other accelerator backends) need an accelerator tensor; gloo takes CPU tensors,
    and the result is read on the host anyway.
    """
    backend = str(dist.get_backend(process_group)).lower()
    if backend == "gloo" or backend == "mpi":
        return torch.device("cpu")
    if like is not None and like.device.type != "cpu":
        return like.device
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is None:
        return torch.device("cpu")
    return torch.device(acc.type, torch.accelerator.current_device_index())


def all_reduce_max_flag(flag: bool, process_group: ProcessGroup) -> bool:
    """OR of a boolean over the group (every rank gets the same answer)."""
    if group_size(process_group) == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=reduce_device(process_group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
    return bool(t.item() > 0)
