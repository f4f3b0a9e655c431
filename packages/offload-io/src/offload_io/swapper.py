"""Tensor ⇄ file swapping with prefetch and overlapped write-back.

A :class:`TensorSwapper` keeps named 1-D tensors in files of a :class:`~offload_io.scratch.ScratchDir` and
brings them into buffers of a :class:`~offload_io.buffers.BufferPool` on demand:

- :meth:`prefetch` starts reading a tensor into a free buffer and returns at once;
- :meth:`fetch` returns the tensor in memory (waiting for its read, starting it if needed);
- :meth:`write_back` starts writing a fetched tensor back; its buffer returns to the pool once the write
  is done, which is only waited for when a buffer is needed again. Reads and writes use separate IO handles,
  so waiting for a read never waits for unrelated write-back;
- :meth:`discard` gives a fetched tensor's buffer back without writing (it was only read).

Every tensor is one file, written whole and padded to a multiple of the pool's alignment (so an O_DIRECT
engine only ever moves whole blocks from aligned buffers); before each read the file's size is checked, so a swap file that
was removed or truncated under a running job is an error naming the file (never zeros or stale data).
Time spent blocked on IO is recorded in :attr:`stats` (the benchmark reports how much IO was hidden).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from offload_io.buffers import BufferPool, padded_numel
from offload_io.io import IOHandle, SwapIOError
from offload_io.scratch import ScratchDir

__all__ = ["SwapStats", "TensorSwapper"]


@dataclass
class SwapStats:
    """Counters of one swapper: bytes moved and seconds the caller was blocked waiting for IO."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_wait_s: float = 0.0
    write_wait_s: float = 0.0
    reads: int = 0
    writes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero every counter."""
        self.bytes_read = self.bytes_written = self.reads = self.writes = 0
        self.read_wait_s = self.write_wait_s = 0.0


class TensorSwapper:
    """Named tensors in swap files, fetched through a bounded buffer pool (see the module docstring)."""

    def __init__(self, scratch: ScratchDir, pool: BufferPool, read_handle: IOHandle, write_handle: IOHandle) -> None:
        self.scratch = scratch
        self.pool = pool
        self.reader = read_handle
        self.writer = write_handle
        self._numel: dict[str, int] = {}
        self._io_numel: dict[str, int] = {}  # padded to the alignment: what is read and written
        self._on_disk: set[str] = set()
        self._reading: dict[str, torch.Tensor] = {}
        self._resident: dict[str, torch.Tensor] = {}
        self._writing: dict[str, torch.Tensor] = {}
        self.stats = SwapStats()

    # ---- registry ------------------------------------------------------------------------------------

    def register(self, key: str, numel: int) -> None:
        """Declare tensor ``key`` of ``numel`` elements of the pool's dtype (its file is written later)."""
        io = padded_numel(numel, self.pool.itemsize, self.pool.alignment)
        if io > self.pool.numel:
            raise ValueError(
                f"swap tensor {key}: {numel} elements (padded to {io}) do not fit the pool's "
                f"{self.pool.numel}-element buffers"
            )
        self._numel[key] = int(numel)
        self._io_numel[key] = io

    def path(self, key: str) -> str:
        """The swap file of ``key``."""
        return os.fspath(self.scratch.file(key.replace("/", "_") + ".swp"))

    def on_disk(self, key: str) -> bool:
        """True once ``key`` has been written at least once."""
        return key in self._on_disk

    def is_resident(self, key: str) -> bool:
        """True while ``key`` is fetched (in a buffer, not yet written back or discarded)."""
        return key in self._resident

    # ---- in and out ------------------------------------------------------------------------------------

    def new(self, key: str) -> torch.Tensor:
        """A buffer for ``key`` that starts resident without a read (its first value is written by the caller)."""
        if key in self._resident:
            return self._resident[key][: self._numel[key]]
        self._finish_write_of(key)
        buf = self._acquire(self._io_numel[key])
        self._resident[key] = buf
        return buf[: self._numel[key]]

    def prefetch(self, key: str) -> None:
        """Start reading ``key`` (no-op when it is resident or already being read)."""
        if key in self._resident or key in self._reading:
            return
        if key not in self._on_disk:
            raise KeyError(f"swap tensor {key} was never written (nothing to read)")
        self._finish_write_of(key)
        path, numel = self.path(key), self._io_numel[key]
        buf = self._acquire(numel)
        nbytes = numel * buf.element_size()
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            self.pool.release(buf)
            raise SwapIOError(
                2, f"swap file {path} of {key} is missing: the swap directory was removed or cleaned while training"
            ) from None
        if size < nbytes:
            self.pool.release(buf)
            raise SwapIOError(
                5, f"swap file {path} of {key} has {size} bytes, expected {nbytes}: truncated while training"
            )
        self.reader.async_pread(buf, path, 0)
        self._reading[key] = buf
        self.stats.reads += 1
        self.stats.bytes_read += nbytes

    def fetch(self, key: str) -> torch.Tensor:
        """``key`` in memory (a pool buffer), reading it first when needed."""
        if key in self._resident:
            return self._resident[key][: self._numel[key]]
        self.prefetch(key)
        t0 = time.perf_counter()
        try:
            self.reader.wait()  # every read in flight; they were queued in the order they are needed
        except Exception:
            for b in self._reading.values():
                self.pool.release(b)
            self._reading.clear()
            raise
        finally:
            self.stats.read_wait_s += time.perf_counter() - t0
        self._resident.update(self._reading)
        self._reading.clear()
        return self._resident[key][: self._numel[key]]

    def write_back(self, key: str) -> None:
        """Start writing the resident ``key`` to its file; its buffer is reused once the write completes."""
        buf = self._resident.pop(key)
        self.writer.async_pwrite(buf, self.path(key), 0)
        self._writing[key] = buf
        self._on_disk.add(key)
        self.stats.writes += 1
        self.stats.bytes_written += buf.numel() * buf.element_size()

    def discard(self, key: str) -> None:
        """Drop the resident ``key`` without writing it (its file keeps the last written value)."""
        self.pool.release(self._resident.pop(key))

    def flush(self) -> None:
        """Wait for every write-back and return the buffers to the pool."""
        if not self._writing:
            return
        t0 = time.perf_counter()
        try:
            self.writer.wait()
        finally:
            self.stats.write_wait_s += time.perf_counter() - t0
            for buf in self._writing.values():
                self.pool.release(buf)
            self._writing.clear()

    def _finish_write_of(self, key: str) -> None:
        # Reading a file while its write-back is in flight could see half-old data: finish the writes first.
        if key in self._writing:
            self.flush()

    def _acquire(self, numel: int) -> torch.Tensor:
        if self.pool.free == 0 and self._writing:
            self.flush()
        return self.pool.acquire(numel)
