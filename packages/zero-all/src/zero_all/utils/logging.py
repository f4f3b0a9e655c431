"""DeepSpeed's logging helpers: ``logger``, ``log_dist``, ``print_dist`` and ``see_memory_usage``.

``log_dist(msg, ranks=[0])`` logs ``"[Rank 0] msg"`` on the listed ranks only (``[-1]``: every rank;
before torch.distributed is initialised: always, with rank -1), as DeepSpeed's does.
"""

from __future__ import annotations

import gc
import logging

import torch.distributed as dist

__all__ = ["get_dist_msg", "log_dist", "logger", "print_dist", "see_memory_usage"]

logger = logging.getLogger("zero_all")
"""The ``zero_all`` logger (DeepSpeed's ``deepspeed.utils.logger``)."""


def get_dist_msg(message: str, ranks: list[int] | None = None) -> str | None:
    """``"[Rank r] message"`` when this rank should log it (see the module docstring), else None."""
    initialized = dist.is_available() and dist.is_initialized()
    my_rank = dist.get_rank() if initialized else -1
    ranks = ranks or []
    should = not initialized or (bool(ranks) and (ranks[0] == -1 or my_rank in set(ranks)))
    return f"[Rank {my_rank}] {message}" if should else None


def log_dist(message: str, ranks: list[int] | None = None, level: int = logging.INFO) -> None:
    """Log ``message`` on ``ranks`` (DeepSpeed's ``log_dist``)."""
    final = get_dist_msg(message, ranks)
    if final is not None:
        logger.log(level, final)


def print_dist(message: str, ranks: list[int] | None = None) -> None:
    """Print ``message`` on ``ranks`` whatever the log level."""
    final = get_dist_msg(message, ranks)
    if final is not None:
        print(final)


def see_memory_usage(message: str, force: bool = False) -> None:
    """Print the accelerator's allocated/peak memory and the host's used memory (rank 0; only with force=True).

    As DeepSpeed's: does nothing unless ``force``; resets the peak counters afterwards so the next
    call reports the peak since this one.
    """
    if not force or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    from zero_all.accelerator import CPUAccelerator, get_accelerator

    gc.collect()  # report memory actually held, not garbage waiting for collection
    acc = get_accelerator()
    gib = 1024**3
    print(message)
    print(
        f"MA {round(acc.memory_allocated() / gib, 2)} GB         Max_MA {round(acc.max_memory_allocated() / gib, 2)} GB"
        f"         CA {round(acc.memory_reserved() / gib, 2)} GB         Max_CA {round(acc.max_memory_reserved() / gib)} GB "
    )
    host = CPUAccelerator()
    total, avail = host.total_memory(), host.available_memory()
    print(
        f"CPU Virtual Memory:  used = {round((total - avail) / gib, 2)} GB, percent = {round(100 * (total - avail) / total, 1)}%"
    )
    acc.reset_peak_memory_stats()
