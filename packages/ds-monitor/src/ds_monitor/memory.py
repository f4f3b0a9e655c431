"""Memory figures: device allocated/peak on an accelerator, process RSS and peak RSS on CPU.

All figures are in GiB. On CPU, RSS is read from ``/proc/self/statm`` (Linux) and the peak from
``resource.getrusage`` (``ru_maxrss``), so no extra package is needed.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["format_memory_stats", "memory_events", "memory_stats", "process_memory"]

GIB = float(1 << 30)


def process_memory() -> dict[str, float]:
    """``{"rss_gb", "peak_rss_gb"}`` of this process."""
    rss = 0.0
    try:
        with open("/proc/self/statm") as handle:
            rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    peak = 0.0
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError):
        pass
    rss = rss or peak
    return {"rss_gb": rss / GIB, "peak_rss_gb": max(peak, rss) / GIB}


def memory_stats(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory figures for ``device`` (default: the current accelerator if any, else CPU).

    CUDA: ``allocated_gb``, ``max_allocated_gb``, ``reserved_gb``, ``max_reserved_gb``.
    CPU: ``rss_gb``, ``peak_rss_gb``.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "allocated_gb": torch.cuda.memory_allocated(device) / GIB,
            "max_allocated_gb": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gb": torch.cuda.memory_reserved(device) / GIB,
            "max_reserved_gb": torch.cuda.max_memory_reserved(device) / GIB,
        }
    if device.type == "cpu":
        return process_memory()
    # Other accelerators (xpu, mps, ...) through torch.accelerator where this torch has it.
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "memory_allocated"):
        return {
            "allocated_gb": accel.memory_allocated(device) / GIB,
            "max_allocated_gb": accel.max_memory_allocated(device) / GIB,
        }
    return process_memory()


def format_memory_stats(device: torch.device | str | None = None) -> str:
    """``MemAllocated=0.12GB | MaxMemAllocated=...`` style one-liner."""
    names = {
        "allocated_gb": "MemAllocated",
        "max_allocated_gb": "MaxMemAllocated",
        "reserved_gb": "MemReserved",
        "max_reserved_gb": "MaxMemReserved",
        "rss_gb": "RSS",
        "peak_rss_gb": "PeakRSS",
    }
    return " | ".join(f"{names[key]}={value:.2f}GB" for key, value in memory_stats(device).items())


def memory_events(step: int, device: torch.device | str | None = None, prefix: str = "Memory/") -> list:
    """Monitor events ``(prefix + name, GiB, step)`` for :func:`memory_stats`."""
    return [(prefix + key, value, step) for key, value in memory_stats(device).items()]
