"""Stage-3 parameter partitions offloaded to CPU memory or NVMe (``zero_optimization.offload_param``).

A ZeRO-3 rank keeps its 1/N partition (the *shard*, in the compute dtype) of every parameter between uses.
With ``offload_param.device='cpu'`` the shards of an accelerator model live in host memory (pinned when
``pin_memory``); a gather copies the shard up. With ``'nvme'`` the shards live in swap files:
:class:`SwappedParams` writes a shard after each optimizer step and reads it into the gather buffer when the
module is fetched (directly for a CPU model; through one pinned staging buffer of ``buffer_size``
elements for an accelerator model). ``max_in_cpu`` elements of shards stay in memory
instead (the first units asked for), as DeepSpeed keeps that many parameters in CPU memory.

The reads are synchronous but happen when a unit is *launched*, which the stage-3 prefetcher does ahead
of use; they are not yet overlapped with compute on another thread.
"""

from __future__ import annotations

import os

import torch

from offload_io.buffers import BufferPool
from offload_io.config import AioConfig, OffloadParamConfig
from offload_io.io import SwapIOError, open_handle
from offload_io.scratch import ScratchDir

__all__ = ["SwappedParams"]


class SwappedParams:
    """Shards in swap files under ``config.nvme_path`` (see the module docstring)."""

    def __init__(self, config: OffloadParamConfig, *, aio: AioConfig | None, dtype: torch.dtype, tag: str) -> None:
        if config.nvme_path is None:
            raise ValueError("offload_param.device='nvme' needs offload_param.nvme_path")
        self.config = config
        self.dtype = dtype
        self.scratch = ScratchDir(config.nvme_path, tag)
        # Buffered IO: shards are read straight into (unaligned) gather buffers, which O_DIRECT would refuse.
        self.handle = open_handle(aio, use_direct=False)
        self.budget = int(config.max_in_cpu)
        self._pool: BufferPool | None = None
        self.bytes_read = self.bytes_written = 0

    def keep_in_cpu(self, numel: int) -> bool:
        """True (and the budget charged) when a shard of ``numel`` elements fits ``max_in_cpu``."""
        if numel <= self.budget:
            self.budget -= numel
            return True
        return False

    def path(self, key: str) -> str:
        """The swap file of shard ``key``."""
        return os.fspath(self.scratch.file(f"{key}.swp"))

    def save(self, key: str, shard: torch.Tensor) -> None:
        """Write ``shard`` (a CPU tensor) to its file, waiting for it."""
        self.handle.sync_pwrite(shard.contiguous(), self.path(key), 0)
        self.bytes_written += shard.numel() * shard.element_size()

    def load(self, key: str, out: torch.Tensor) -> None:
        """Read shard ``key`` into ``out`` (CPU: directly; an accelerator tensor: through the pinned pool)."""
        path = self.path(key)
        nbytes = out.numel() * out.element_size()
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise SwapIOError(2, f"parameter swap file {path} is missing (removed while training?)") from None
        if size < nbytes:
            raise SwapIOError(5, f"parameter swap file {path} has {size} bytes, expected {nbytes}: truncated")
        self.bytes_read += nbytes
        if out.device.type == "cpu" and out.is_contiguous():
            self.handle.sync_pread(out, path, 0)
            return
        pool = self._staging()
        step = pool.numel
        flat = out.reshape(-1)
        for a in range(0, flat.numel(), step):
            n = min(step, flat.numel() - a)
            buf = pool.acquire(n)
            try:
                self.handle.sync_pread(buf, path, a * out.element_size())
                flat[a : a + n].copy_(buf)
            finally:
                pool.release(buf)

    def _staging(self) -> BufferPool:
        if self._pool is None:
            # The reads are synchronous, so one staging buffer of buffer_size elements is all that is ever used
            # (buffer_count is accepted for DeepSpeed's configs).
            self._pool = BufferPool(1, max(1, int(self.config.buffer_size)), self.dtype, pin=self.config.pin_memory)
        return self._pool

    def close(self) -> None:
        """Remove the swap files."""
        self.scratch.cleanup()
