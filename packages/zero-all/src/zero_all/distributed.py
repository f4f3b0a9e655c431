"""torch.distributed set-up from the launcher's environment, and the device each rank uses.

DeepSpeed's launcher (and ds-launch, and torchrun) export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; initialize() joins that group with NCCL when this rank drives a
CUDA device and gloo otherwise. A plain ``python train.py`` (no launcher) gets a one-rank
gloo group, so the same script runs unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["get_device", "init_distributed"]


def get_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    ``DS_ACCELERATOR`` (DeepSpeed's override) chooses instead: ``cpu`` keeps a CUDA machine's ranks on
    the CPU (gloo), ``cuda`` insists on CUDA and fails when torch sees none.
    """
    choice = os.environ.get("DS_ACCELERATOR", "").strip().lower()
    if choice not in ("", "cpu", "cuda"):
        raise ValueError(f"DS_ACCELERATOR={choice!r} is not supported; accepted: 'cpu', 'cuda' (or unset: automatic)")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DS_ACCELERATOR=cuda, but torch {torch.__version__} sees no CUDA device")
    if choice != "cpu" and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(dist_init_required: bool | None = None, timeout: timedelta | None = None) -> None:
    """Join (or create) the default process group if it does not exist yet.

    ``dist_init_required=False`` asks us not to initialise (DeepSpeed's meaning); then the caller
    must have done it, or we run as a single rank without a group.
    """
    if dist.is_initialized() or dist_init_required is False:
        return
    device = get_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"timeout": timeout} if timeout is not None else {}
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        missing = [k for k in ("RANK", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"launcher environment incomplete: {', '.join(missing)} not set (WORLD_SIZE is)")
        dist.init_process_group(backend, init_method="env://", **kwargs)
    else:
        # No launcher: one rank. An in-memory store needs no free port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
