"""The one place offload-io talks to the file IO engine: :func:`open_handle` and :func:`aligned_empty`.

ds-native's ``ds_native.aio`` (O_DIRECT, io_uring / libaio / a C++ thread pool) is used when it is importable.
Otherwise :class:`ThreadPoolHandle` gives the same methods over ``os.preadv``/``os.pwritev`` in a Python thread
pool (the calls release the GIL, so the reads and writes still run while the optimizer computes). Everything
above this module codes against the handle's methods only:

- ``async_pwrite(tensor, path, offset=0)`` / ``async_pread(tensor, path, offset=0)``: queue a request;
- ``wait()``: wait for every queued request, raise the first error (naming the file and offset);
- ``sync_pwrite`` / ``sync_pread``: the same, done before returning;
- ``backend``: a name for reports.

A failed request never reports success: a short read (a truncated or missing scratch file) is an error.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from offload_io.config import AioConfig

__all__ = ["IOHandle", "SwapIOError", "ThreadPoolHandle", "aligned_empty", "native_aio", "open_handle"]


class SwapIOError(OSError):
    """A swap read or write failed; the message names the file, the offset and what went wrong."""


class IOHandle(Protocol):
    """What offload-io needs of an IO engine (``ds_native.aio.AsyncIOHandle`` or :class:`ThreadPoolHandle`)."""

    backend: str

    def async_pwrite(self, tensor: torch.Tensor, path: str, offset: int = 0) -> Any: ...
    def async_pread(self, tensor: torch.Tensor, path: str, offset: int = 0) -> Any: ...
    def wait(self) -> Any: ...
    def sync_pwrite(self, tensor: torch.Tensor, path: str, offset: int = 0) -> Any: ...
    def sync_pread(self, tensor: torch.Tensor, path: str, offset: int = 0) -> Any: ...


def native_aio() -> Any | None:
    """``ds_native.aio`` when this ds-native build has it, else None."""
    try:
        from ds_native import aio  # type: ignore[attr-defined]
    except ImportError:
        return None
    return aio


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype: bf16 has no numpy dtype, uint8 does)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(
            f"swap IO needs a contiguous CPU tensor, got one on {tensor.device} (contiguous: {tensor.is_contiguous()})"
        )
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    # A view over the raw memory, not ``tensor.numpy()``: exporting to numpy pins the storage's size, and
    # ZeRO-3 frees and re-grows parameter storages (resize_) between uses. The caller keeps ``tensor`` alive
    # until the request completes.
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class ThreadPoolHandle:
    """Pure-Python IO handle with ``ds_native.aio.AsyncIOHandle``'s methods (see the module docstring).

    Each request is split into ``intra_op_parallelism`` contiguous parts done in parallel, each in
    ``block_size`` pieces. ``queue_depth``/``single_submit``/``overlap_events`` are accepted for the same
    signature and have no meaning here; ``use_direct`` is ignored (Python cannot easily keep O_DIRECT's
    alignment for every tail), so reads and writes go through the page cache.
    """

    backend = "python-threads"

    def __init__(
        self,
        block_size: int = 8 << 20,
        queue_depth: int = 8,
        single_submit: bool = False,
        overlap_events: bool = True,
        intra_op_parallelism: int = 1,
        use_direct: bool = True,
        backend: str | None = None,
    ) -> None:
        if block_size <= 0 or intra_op_parallelism <= 0:
            raise ValueError(
                f"aio.block_size ({block_size}) and aio.intra_op_parallelism ({intra_op_parallelism}) must be > 0"
            )
        self.block_size = int(block_size)
        self.parallelism = int(intra_op_parallelism)
        # Two workers at least: a write-back and a prefetch read go on at the same time.
        self._pool = ThreadPoolExecutor(max_workers=max(2, self.parallelism), thread_name_prefix="offload-io")
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def _submit(self, write: bool, tensor: torch.Tensor, path: str, offset: int) -> int:
        view = _bytes_view(tensor)
        total = len(view)
        parts = max(1, min(self.parallelism, -(-total // self.block_size)))
        step = -(-total // parts)
        futures = [
            self._pool.submit(self._run, write, view[a : min(a + step, total)], os.fspath(path), offset + a, tensor)
            for a in range(0, max(total, 1), max(step, 1))
        ]
        with self._lock:
            self._pending += futures
        return len(futures)

    def _run(self, write: bool, view: memoryview, path: str, offset: int, owner: torch.Tensor) -> None:
        # ``owner``: the tensor ``view`` points into, held here so its memory outlives the request.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600) if write else os.open(path, os.O_RDONLY)
        except OSError as e:
            verb = "open for writing" if write else "open for reading"
            raise SwapIOError(e.errno, f"cannot {verb} swap file {path}: {e.strerror}") from e
        try:
            done = 0
            while done < len(view):
                chunk = view[done : done + self.block_size]
                try:
                    n = os.pwritev(fd, [chunk], offset + done) if write else os.preadv(fd, [chunk], offset + done)
                except OSError as e:
                    verb = "write" if write else "read"
                    raise SwapIOError(
                        e.errno,
                        f"{verb} of {len(chunk)} bytes at offset {offset + done} of {path} failed: {e.strerror}",
                    ) from e
                if n <= 0:
                    what = "wrote nothing" if write else "ended (the file is shorter than expected: truncated?)"
                    raise SwapIOError(
                        5, f"swap file {path}: {what} at offset {offset + done}, {len(view) - done} bytes left"
                    )
                done += n
        finally:
            os.close(fd)

    def async_pwrite(self, tensor: torch.Tensor, path: str, offset: int = 0) -> int:
        """Queue a write of ``tensor``'s bytes to ``path`` at ``offset`` (the file is created if missing)."""
        return self._submit(True, tensor, path, offset)

    def async_pread(self, tensor: torch.Tensor, path: str, offset: int = 0) -> int:
        """Queue a read of ``tensor.nbytes`` bytes from ``path`` at ``offset`` into ``tensor``."""
        return self._submit(False, tensor, path, offset)

    def wait(self) -> int:
        """Wait for every queued request; raise the first error. Returns how many parts completed."""
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for f in pending:
            e = f.exception()
            if e is not None and first is None:
                first = e
        if first is not None:
            raise first
        return len(pending)

    def sync_pwrite(self, tensor: torch.Tensor, path: str, offset: int = 0) -> None:
        """Write now (waits for this request and any queued before it)."""
        self.async_pwrite(tensor, path, offset)
        self.wait()

    def sync_pread(self, tensor: torch.Tensor, path: str, offset: int = 0) -> None:
        """Read now (waits for this request and any queued before it)."""
        self.async_pread(tensor, path, offset)
        self.wait()

    def close(self) -> None:
        """Stop the worker threads (after the queued requests finish)."""
        self._pool.shutdown(wait=True)


def open_handle(aio: AioConfig | None = None, *, use_direct: bool = True, prefer_native: bool = True) -> IOHandle:
    """An IO handle configured from the ``aio`` section: ds-native's when built, else :class:`ThreadPoolHandle`."""
    aio = aio if aio is not None else AioConfig()
    kwargs = dict(
        block_size=aio.block_size,
        queue_depth=aio.queue_depth,
        single_submit=aio.single_submit,
        overlap_events=aio.overlap_events,
        intra_op_parallelism=aio.intra_op_parallelism,
        use_direct=use_direct,
    )
    native = native_aio() if prefer_native else None
    if native is not None:
        return native.AsyncIOHandle(**kwargs)
    return ThreadPoolHandle(**kwargs)


def aligned_empty(
    numel: int, dtype: torch.dtype = torch.float32, alignment: int = 4096, pin: bool = False
) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor whose data starts on an ``alignment``-byte boundary (O_DIRECT needs it).

    ``pin``: page-locked, for fast asynchronous copies to and from an accelerator (only when CUDA is
    available; silently unpinned otherwise, as there is nothing to pin for). Large buffers are asked to be
    backed by huge pages (ds-native's ``empty_huge``), as CPU Adam's state is.
    """
    native = native_aio()
    pin = bool(pin) and torch.cuda.is_available()
    if native is not None and hasattr(native, "aligned_empty"):
        return native.aligned_empty(numel, dtype, alignment=alignment, pin=pin)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = numel * itemsize
    if pin:
        raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=True)
    else:
        from ds_native.memory import empty_huge

        raw = empty_huge(nbytes + alignment, torch.uint8)
    skip = (-raw.data_ptr()) % alignment
    return raw[skip : skip + nbytes].view(dtype)
