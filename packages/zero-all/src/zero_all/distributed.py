"""torch.distributed set-up from the launcher's environment, and the device each rank uses.

DeepSpeed's launcher (and ds-launch, and torchrun) export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; :func:`init_distributed` joins that group with NCCL when this rank
drives a CUDA device and gloo otherwise (``zero_all.accelerator``'s communication backend), as
``deepspeed.init_distributed`` does. Under ``mpirun`` without those variables it reads them from
the MPI environment (DeepSpeed's ``auto_mpi_discovery``). A plain ``python train.py`` (no launcher,
no MPI) gets a one-rank gloo group in memory, so the same script runs unchanged.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_PORT", "default_timeout", "get_device", "init_distributed", "mpi_environment"]

logger = logging.getLogger("zero_all")

DEFAULT_PORT = 29500
"""DeepSpeed's ``TORCH_DISTRIBUTED_DEFAULT_PORT``: the MASTER_PORT set by MPI discovery."""

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")

# (rank, world size, local rank) variables of the MPI implementations, in the order tried.
_MPI_ENV = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (Hydra)
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH2
)


def default_timeout() -> timedelta:
    """DeepSpeed's default process-group timeout: ``DEEPSPEED_TIMEOUT`` minutes, 10 when unset."""
    raw = os.environ.get("DEEPSPEED_TIMEOUT", "10")
    try:
        return timedelta(minutes=int(raw))
    except ValueError:
        raise ValueError(f"DEEPSPEED_TIMEOUT={raw!r}: must be a whole number of minutes") from None


def get_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def mpi_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the MPI launcher's variables, or None outside MPI."""
    for rank_key, size_key, local_key in _MPI_ENV:
        if rank_key in os.environ and size_key in os.environ:
            rank = int(os.environ[rank_key])
            local = os.environ.get(local_key)
            return rank, int(os.environ[size_key]), int(local) if local is not None else rank
    return None


def _mpi_master_addr(rank: int) -> str:
    """Rank 0's address, broadcast over MPI (mpi4py), or MASTER_ADDR when mpi4py is not installed."""
    try:
        from mpi4py import MPI  # type: ignore[import-not-found]
    except ImportError:
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        raise RuntimeError(
            "init_distributed: running under MPI without MASTER_ADDR, and mpi4py (needed to find rank 0's "
            "address) is not installed; `pip install mpi4py`, export MASTER_ADDR, or launch with ds-launch"
        ) from None
    import socket

    addr = socket.gethostbyname(socket.gethostname()) if rank == 0 else None
    return str(MPI.COMM_WORLD.bcast(addr, root=0))


def _discover_mpi(distributed_port: int, verbose: bool) -> bool:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from MPI (DeepSpeed's mpi_discovery)."""
    found = mpi_environment()
    if found is None:
        return False
    rank, world_size, local_rank = found
    os.environ["MASTER_ADDR"] = _mpi_master_addr(rank)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ.setdefault("MASTER_PORT", str(distributed_port))
    if verbose:
        logger.info(
            "MPI discovery: rank=%d local_rank=%d world_size=%d master=%s:%s",
            rank,
            local_rank,
            world_size,
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
        )
    return True


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int | None = DEFAULT_PORT,
    verbose: bool = True,
    timeout: timedelta | None = None,
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """Join (or create) the default process group, with ``deepspeed.init_distributed``'s arguments.

    Args:
        dist_backend: torch.distributed backend; None: ``get_accelerator().communication_backend_name()``
            (nccl on CUDA, gloo on the CPU).
        auto_mpi_discovery: when the launcher's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK are not
            all set and this process runs under MPI, read them from the MPI environment.
        distributed_port: the MASTER_PORT that MPI discovery sets (None: 29500).
        verbose: log what was discovered and initialised (logger ``zero_all``, level INFO).
        timeout: the process group's timeout (None: ``DEEPSPEED_TIMEOUT`` minutes, default 10).
        init_method: torch's URL (``"tcp://host:port"``, ``"file:///path"``); None: ``env://`` under a
            launcher. ``rank``/``world_size`` go with it (-1: from the environment).
        dist_init_required: None: initialise unless already done; True: the same; False: the caller
            must have initialised torch.distributed (an error otherwise, as in DeepSpeed).
        config: DeepSpeed passes its config for the comms logger; accepted and unused.
        rank, world_size: this process's rank and the group size for ``init_method`` (-1: from the
            environment).

    Without a launcher, MPI or ``init_method``, the process joins a one-rank gloo group held in memory
    (DeepSpeed would try mpi4py and fail), so ``python train.py`` runs as one rank.
    """
    del config  # DeepSpeed's comms-logger settings: nothing here reads them
    if timeout is None:
        timeout = default_timeout()
    if not isinstance(timeout, timedelta):
        raise TypeError(f"init_distributed: timeout must be a datetime.timedelta, got {type(timeout).__name__}")
    if dist.is_initialized():
        if verbose and int(os.environ.get("RANK", "0")) == 0:
            logger.info("init_distributed: torch.distributed is already initialized")
        return
    if dist_init_required is False:
        raise RuntimeError(
            "init_distributed: dist_init_required=False but torch.distributed is not initialized; "
            "call torch.distributed.init_process_group() first or pass dist_init_required=None/True"
        )
    device = get_device()
    if dist_backend is None:
        dist_backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"timeout": timeout}
    if init_method is not None:
        if rank >= 0:
            kwargs["rank"] = rank
        if world_size >= 0:
            kwargs["world_size"] = world_size
        _init(dist_backend, init_method=init_method, **kwargs)
        return
    if auto_mpi_discovery and not all(k in os.environ for k in _LAUNCHER_ENV):
        _discover_mpi(DEFAULT_PORT if distributed_port is None else int(distributed_port), verbose)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        missing = [k for k in ("RANK", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"init_distributed: launcher environment incomplete: {', '.join(missing)} not set (WORLD_SIZE is)"
            )
        if rank >= 0:
            kwargs["rank"] = rank
        if world_size >= 0:
            kwargs["world_size"] = world_size
        _init(dist_backend, init_method="env://", **kwargs)
    else:
        if world_size > 1:
            raise RuntimeError(
                f"init_distributed: world_size={world_size} but no launcher environment (MASTER_ADDR, WORLD_SIZE) "
                "and no init_method; launch with ds-launch/torchrun or pass init_method='tcp://host:port'"
            )
        # No launcher: one rank. An in-memory store needs no free port.
        _init(dist_backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    if verbose and dist.get_rank() == 0:
        logger.info("init_distributed: backend=%s world_size=%d", dist_backend, dist.get_world_size())


def _init(backend: str, **kwargs: Any) -> None:
    try:
        dist.init_process_group(backend, **kwargs)
    except (RuntimeError, ValueError) as e:
        where = kwargs.get("init_method") or "in-memory store"
        raise RuntimeError(
            f"init_distributed: could not create the {backend!r} process group via {where} "
            f"(RANK={os.environ.get('RANK')}, WORLD_SIZE={os.environ.get('WORLD_SIZE')}, "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}"
        ) from e
