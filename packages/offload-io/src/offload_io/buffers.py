"""A bounded pool of aligned (and, with CUDA, pinned) CPU buffers for swapping.

The pool is the whole of the CPU memory NVMe offload uses for the swapped tensors: ``count`` buffers of
``numel`` elements each, allocated once. A swap-in takes a buffer, a swap-out gives it back once the write
has finished. Running out is a bug in the caller's scheduling (it asked for more tensors in flight than
it sized the pool for), reported as such rather than by allocating more and breaking the memory bound.
"""

from __future__ import annotations

import torch

from offload_io.io import aligned_empty

__all__ = ["BufferPool", "PoolExhaustedError", "padded_numel"]


def padded_numel(numel: int, itemsize: int, alignment: int = 4096) -> int:
    """``numel`` rounded up so that the bytes are a multiple of ``alignment`` (O_DIRECT transfers whole blocks)."""
    per = max(1, alignment // itemsize)
    return -(-int(numel) // per) * per


class PoolExhaustedError(RuntimeError):
    """Every buffer of a :class:`BufferPool` is in use."""


class BufferPool:
    """``count`` aligned CPU buffers of ``numel`` elements of ``dtype`` (see the module docstring)."""

    def __init__(
        self, count: int, numel: int, dtype: torch.dtype = torch.float32, *, pin: bool = False, alignment: int = 4096
    ) -> None:
        if count < 1 or numel < 1:
            raise ValueError(f"BufferPool needs count >= 1 and numel >= 1, got count={count}, numel={numel}")
        self.numel = int(numel)
        self.dtype = dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.alignment = alignment
        self._buffers = [aligned_empty(self.numel, dtype, alignment=alignment, pin=pin) for _ in range(count)]
        self._free = list(range(count))
        self._owner: dict[int, int] = {}  # data_ptr of a handed-out view -> buffer index

    @property
    def count(self) -> int:
        """Buffers in the pool."""
        return len(self._buffers)

    @property
    def free(self) -> int:
        """Buffers not handed out."""
        return len(self._free)

    def nbytes(self) -> int:
        """Bytes the pool holds (all buffers)."""
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def acquire(self, numel: int) -> torch.Tensor:
        """A free buffer's first ``numel`` elements (aligned); :class:`PoolExhaustedError` when none is free."""
        if numel > self.numel:
            raise ValueError(f"BufferPool: asked for {numel} elements, buffers hold {self.numel}")
        if not self._free:
            raise PoolExhaustedError(f"BufferPool: all {self.count} buffers of {self.numel} elements are in use")
        i = self._free.pop()
        view = self._buffers[i][:numel]
        self._owner[view.data_ptr()] = i
        return view

    def release(self, view: torch.Tensor) -> None:
        """Give back a buffer from :meth:`acquire` (its data is no longer needed)."""
        i = self._owner.pop(view.data_ptr(), None)
        if i is None:
            raise ValueError("BufferPool.release: not a buffer handed out by this pool (or released twice)")
        self._free.append(i)
