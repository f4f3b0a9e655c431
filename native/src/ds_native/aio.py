"""Async file IO for contiguous CPU tensors: O_DIRECT, blocks in parallel, io_uring / libaio / threads.

What ZeRO-Infinity's NVMe offload needs from a disk: write a tensor to a file at an offset, read it
back into the same memory, many at once, at the disk's speed, and know for certain whether each
request succeeded. DeepSpeed users will recognise the API (``aio_handle`` and ``AsyncIOBuilder`` are
thin aliases with DeepSpeed's defaults and return values)::

    from ds_native.aio import AsyncIOHandle, aligned_empty

    h = AsyncIOHandle()                                  # 8 MiB blocks, queue depth 8
    buf = aligned_empty(1 << 20, torch.float32)          # O_DIRECT-safe, 4 KiB aligned
    h.async_pwrite(buf, "/nvme/x.swp")                   # returns a request id at once
    h.wait()                                             # 1: requests completed; raises the first error
    h.sync_pread(buf, "/nvme/x.swp")

How a request runs: the file range that is 4 KiB-aligned goes through an ``O_DIRECT`` descriptor in
``block_size`` pieces, up to ``queue_depth`` in flight per worker, ``intra_op_parallelism`` workers.
An unaligned head or tail (any size, any offset is allowed) goes through a buffered descriptor of the
same file, so round trips are exact and a write never pads or truncates the file. Memory that is
not 4 KiB-aligned is staged through a per-slot aligned bounce buffer (one ``block_size`` each,
allocated on first need); ``aligned_empty`` buffers avoid that copy. ``O_DIRECT`` bypasses the page
cache, so reads measure the disk, not memory. Filesystems without ``O_DIRECT`` (or
``use_direct=False``) use buffered IO throughout.

Errors are ``OSError`` (``PermissionError``, ``FileNotFoundError``... where Python maps the errno)
with ``errno``, ``filename``, and the attributes ``op`` ("read"/"write"), ``offset``, ``nbytes``
(the request) and ``fail_offset``, ``fail_len`` (the first failing block). A request that cannot
start (the file cannot be opened, a read past the end of the file: ``errno.ENODATA``) raises from
``async_pread``/``async_pwrite`` and queues nothing; a failure while it runs (``ENOSPC``, ``EIO``, a
short read or write) raises from ``wait()``. A failed request never reports success; its blocks not
yet started are skipped, and the other requests complete normally.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

from ds_native import _ds_native_aio, memory

ALIGNMENT = 4096
DEFAULT_BLOCK_SIZE = 8 << 20
"""``AsyncIOHandle``'s default bytes per IO operation (DeepSpeed's ``aio.block_size`` default is 1 MiB)."""
DEFAULT_QUEUE_DEPTH = 8
"""``AsyncIOHandle``'s default operations in flight per worker (DeepSpeed's ``aio.queue_depth`` default)."""
_ORDER = ("io_uring", "libaio", "threadpool")
_ENV_BACKEND = "DS_NATIVE_AIO_BACKEND"


def backend_report() -> list[dict[str, Any]]:
    """Every IO backend with ``name``, ``compiled``, ``usable`` (probed now) and ``reason`` when not."""
    return [
        {"name": name, "compiled": compiled, "usable": usable, "reason": reason or None}
        for name, compiled, usable, reason in _ds_native_aio.probe()
    ]


def backends() -> list[str]:
    """The backends usable on this machine now, best first (a run-time probe: io_uring may be compiled
    in but forbidden by the kernel or a container's seccomp profile)."""
    return [b["name"] for b in backend_report() if b["usable"]]


def default_backend() -> str:
    """The backend ``AsyncIOHandle(backend=None)`` uses: ``$DS_NATIVE_AIO_BACKEND`` when set, else the
    first usable of io_uring, libaio, threadpool."""
    forced = os.environ.get(_ENV_BACKEND)
    if forced:
        return _check_backend(forced, f"${_ENV_BACKEND}")
    usable = backends()
    return next(name for name in _ORDER if name in usable)


def _check_backend(name: str, what: str) -> str:
    report = {b["name"]: b for b in backend_report()}
    if name not in report:
        raise ValueError(f"{what}: unknown aio backend {name!r}; accepted: {', '.join(_ORDER)}")
    if not report[name]["usable"]:
        raise RuntimeError(f"{what}: aio backend {name!r} is not usable here: {report[name]['reason']}")
    return name


def aligned_empty(
    numel: int,
    dtype: torch.dtype = torch.uint8,
    alignment: int = ALIGNMENT,
    pin: bool = False,
    huge_pages: bool | None = None,
) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor of ``numel`` elements whose memory starts on an ``alignment``
    boundary (a power of two, at least 512): O_DIRECT reads and writes use it without a bounce copy.

    ``pin=True`` allocates page-locked (pinned) memory when CUDA is available, for fast copies to and
    from the GPU; on a machine without CUDA the buffer is ordinary memory (nothing to pin for).

    ``huge_pages`` (default: for unpinned buffers of 4 MiB and more) starts the buffer on a huge-page
    boundary and asks Linux to back it with transparent huge pages. Every O_DIRECT operation pins and
    maps its memory page by page, so 2 MiB pages instead of 4 KiB ones make each 1 MiB block cheaper:
    measured on the 2-core VM of docs/aio.md, 1 MiB x 8 reads ran 1.6x faster from such a buffer.
    """
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"aligned_empty: numel must be an int >= 0, got {numel!r}")
    if alignment < 512 or alignment & (alignment - 1):
        raise ValueError(f"aligned_empty: alignment must be a power of two >= 512, got {alignment}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    pinned = bool(pin and torch.cuda.is_available())
    if huge_pages is None:
        huge_pages = not pinned and nbytes >= memory.MIN_BYTES
    huge = memory.huge_page_bytes() if huge_pages and not pinned else 0
    alignment = max(alignment, huge)
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pinned)
    shift = (-raw.data_ptr()) % alignment
    if huge:
        # Before the first touch: the advice decides which pages the first faults bring in.
        memory.advise_huge_pages(raw[shift : shift + nbytes])
    # The slice shares raw's storage, which stays alive as long as the returned view.
    return raw[shift : shift + nbytes].view(dtype)


def _as_buffer(tensor: torch.Tensor, op: str) -> tuple[int, int]:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{op}: the tensor must be on the CPU, got {tensor.device} (copy it to a pinned buffer)")
    if not tensor.is_contiguous():
        raise ValueError(f"{op}: the tensor must be contiguous (call .contiguous() first)")
    return tensor.data_ptr(), tensor.numel() * tensor.element_size()


def _error(result: tuple, call: str | None = None) -> OSError:
    """The OSError for one failed request (Python maps the errno to PermissionError etc.)."""
    _id, read, path, offset, nbytes, errnum, fail_offset, fail_len, detail = result
    op = "read" if read else "write"
    what = f"{call or 'async ' + op} of {nbytes} bytes at offset {offset} failed"
    if (fail_offset, fail_len) != (offset, nbytes):
        what += f" (at bytes {fail_offset}..{fail_offset + fail_len})"
    what += f": {os.strerror(errnum)}"
    if detail:
        what += f"; {detail}"
    err = OSError(errnum, what, path)
    err.op, err.offset, err.nbytes, err.fail_offset, err.fail_len = op, offset, nbytes, fail_offset, fail_len
    return err


class AsyncIOHandle:
    """A queue of asynchronous file reads and writes of contiguous CPU tensors.

    Args:
        block_size: bytes per IO operation (a positive multiple of 4096; DeepSpeed's
            ``aio.block_size``). The default, :data:`DEFAULT_BLOCK_SIZE` (8 MiB), is larger than
            DeepSpeed's 1 MiB: on the VM of docs/aio.md 1 MiB blocks ran 20-25% below 8 MiB ones
            (median of 9 runs of 1 GiB, read and write), and a large sequential request gains
            nothing from smaller pieces; a smaller value still splits a request more finely.
        queue_depth: operations in flight per worker (``aio.queue_depth``); for the thread-pool
            backend, ``queue_depth * intra_op_parallelism`` threads.
        single_submit: submit operations one per system call instead of in batches
            (``aio.single_submit``).
        overlap_events: refill the queue as each operation completes (True) or only when the whole
            batch has (DeepSpeed's lock-step mode, ``aio.overlap_events=False``).
        intra_op_parallelism: worker threads sharing the requests' blocks
            (``aio.intra_op_parallelism``, DeepSpeed's ``thread_count``).
        use_direct: O_DIRECT for the aligned part of each request (the page cache is bypassed);
            False: buffered IO.
        backend: ``"io_uring"``, ``"libaio"``, ``"threadpool"``, or None for ``default_backend()``.

    Buffers must stay untouched until their request is collected by ``wait()``; the handle keeps
    a reference to each tensor until then. Closing (``close()``, ``with``, or garbage collection)
    waits for outstanding requests first.
    """

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        single_submit: bool = False,
        overlap_events: bool = True,
        intra_op_parallelism: int = 1,
        use_direct: bool = True,
        backend: str | None = None,
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0 or block_size % ALIGNMENT or block_size > 1 << 30:
            raise ValueError(f"block_size must be a positive multiple of {ALIGNMENT} up to 1 GiB, got {block_size!r}")
        if not isinstance(queue_depth, int) or not 1 <= queue_depth <= 4096:
            raise ValueError(f"queue_depth must be an int in 1..4096, got {queue_depth!r}")
        if not isinstance(intra_op_parallelism, int) or not 1 <= intra_op_parallelism <= 256:
            raise ValueError(f"intra_op_parallelism must be an int in 1..256, got {intra_op_parallelism!r}")
        name = default_backend() if backend is None else _check_backend(backend, "AsyncIOHandle(backend=...)")
        self._block_size, self._queue_depth = block_size, queue_depth
        self._single_submit, self._overlap_events = bool(single_submit), bool(overlap_events)
        self._intra_op, self._use_direct = intra_op_parallelism, bool(use_direct)
        self._live: dict[int, torch.Tensor] = {}
        try:
            self._engine = _ds_native_aio.Engine(
                name, block_size, queue_depth, intra_op_parallelism, self._single_submit, self._overlap_events,
                self._use_direct,
            )  # fmt: skip
        except RuntimeError as e:
            msg = str(e)
            if msg.startswith("errno "):
                code, _, rest = msg[6:].partition(": ")
                raise OSError(int(code), f"AsyncIOHandle(backend={name!r}): {rest}") from None
            raise
        self.backend: str = name
        """The backend this handle runs on: ``"io_uring"``, ``"libaio"`` or ``"threadpool"``."""

    # --- the API -----------------------------------------------------------------------------
    def async_pwrite(self, tensor: torch.Tensor, path: str | os.PathLike, offset: int = 0) -> int:
        """Start writing ``tensor``'s bytes to ``path`` at byte ``offset``; returns the request id.

        The file is created (mode 0644) if missing and extended as needed; bytes outside the range
        are kept. Raises OSError at once if the file cannot be opened.
        """
        return self._submit(False, tensor, path, offset, "async_pwrite")

    def async_pread(self, tensor: torch.Tensor, path: str | os.PathLike, offset: int = 0) -> int:
        """Start reading ``tensor.nbytes`` bytes of ``path`` from byte ``offset`` into ``tensor``;
        returns the request id. Raises OSError at once if the file cannot be opened, or (ENODATA)
        if it is too small for the read."""
        return self._submit(True, tensor, path, offset, "async_pread")

    def wait(self) -> int:
        """Wait (GIL released) for every outstanding request; returns how many completed.

        Raises the first failed request's OSError after all have finished; the others' errors are
        attached as notes. Every request counts as collected either way.
        """
        results = self._engine.wait_all()
        for result in results:  # only these: another thread may have queued more meanwhile
            self._live.pop(result[0], None)
        failed = [r for r in results if r[5] != 0]
        if failed:
            err = _error(failed[0])
            for other in failed[1:]:
                err.add_note(f"also failed: {_error(other)}")
            raise err
        return len(results)

    def sync_pwrite(self, tensor: torch.Tensor, path: str | os.PathLike, offset: int = 0) -> int:
        """Write ``tensor`` to ``path`` at ``offset`` and wait for it (only it); returns 1."""
        return self._run(self._submit(False, tensor, path, offset, "sync_pwrite"))

    def sync_pread(self, tensor: torch.Tensor, path: str | os.PathLike, offset: int = 0) -> int:
        """Read ``path`` at ``offset`` into ``tensor`` and wait for it (only it); returns 1."""
        return self._run(self._submit(True, tensor, path, offset, "sync_pread"))

    def outstanding(self) -> int:
        """Requests submitted and not finished yet."""
        return self._engine.outstanding()

    def close(self) -> None:
        """Wait for outstanding requests (their results are dropped) and stop the workers."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
            self._live.clear()

    def __enter__(self) -> AsyncIOHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AsyncIOHandle(backend={self.backend!r}, block_size={self._block_size}, queue_depth={self._queue_depth}, "
            f"single_submit={self._single_submit}, overlap_events={self._overlap_events}, "
            f"intra_op_parallelism={self._intra_op}, use_direct={self._use_direct})"
        )

    # --- DeepSpeed's accessors ---------------------------------------------------------------
    def get_block_size(self) -> int:
        """``block_size`` (DeepSpeed's accessor)."""
        return self._block_size

    def get_queue_depth(self) -> int:
        """``queue_depth`` (DeepSpeed's accessor)."""
        return self._queue_depth

    def get_single_submit(self) -> bool:
        """``single_submit`` (DeepSpeed's accessor)."""
        return self._single_submit

    def get_overlap_events(self) -> bool:
        """``overlap_events`` (DeepSpeed's accessor)."""
        return self._overlap_events

    def get_intra_op_parallelism(self) -> int:
        """``intra_op_parallelism`` (DeepSpeed's accessor; older DeepSpeed calls it ``get_thread_count``)."""
        return self._intra_op

    get_thread_count = get_intra_op_parallelism

    def get_alignment(self) -> int:
        """The buffer and file alignment O_DIRECT uses here (4096)."""
        return ALIGNMENT

    def new_cpu_locked_tensor(self, num_elem: int, example_tensor: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's pinned buffer: ``aligned_empty(num_elem, example_tensor.dtype, pin=True)``."""
        return aligned_empty(int(num_elem), example_tensor.dtype, pin=True)

    def free_cpu_locked_tensor(self, tensor: torch.Tensor) -> None:
        """DeepSpeed's counterpart of ``new_cpu_locked_tensor``: the memory goes with the last reference."""

    @staticmethod
    def is_pinned(tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is page-locked host memory (CUDA pinned)."""
        return bool(tensor.is_pinned()) if torch.cuda.is_available() else False

    def read(self, buffer: torch.Tensor, filename: str, validate: bool = False, file_offset: int = 0) -> int:
        """DeepSpeed's synchronous read (``validate`` is accepted and ignored: results are checked always)."""
        return self.sync_pread(buffer, filename, file_offset)

    def write(self, buffer: torch.Tensor, filename: str, validate: bool = False, file_offset: int = 0) -> int:
        """DeepSpeed's synchronous write (``validate`` is accepted and ignored)."""
        return self.sync_pwrite(buffer, filename, file_offset)

    def pread(self, buffer: torch.Tensor, filename: str, validate: bool = False, *args: Any, **kwargs: Any) -> int:
        """DeepSpeed's ``pread(buffer, filename, validate, async, file_offset=0)``: asynchronous when
        ``async`` is true (then ``wait()`` collects it), else synchronous."""
        is_async, offset = _ds_async_args("pread", args, kwargs)
        if is_async:
            self._submit(True, buffer, filename, offset, "pread")
            return 0
        return self.sync_pread(buffer, filename, offset)

    def pwrite(self, buffer: torch.Tensor, filename: str, validate: bool = False, *args: Any, **kwargs: Any) -> int:
        """DeepSpeed's ``pwrite(buffer, filename, validate, async, file_offset=0)``."""
        is_async, offset = _ds_async_args("pwrite", args, kwargs)
        if is_async:
            self._submit(False, buffer, filename, offset, "pwrite")
            return 0
        return self.sync_pwrite(buffer, filename, offset)

    # --- internals ---------------------------------------------------------------------------
    def _submit(self, read: bool, tensor: torch.Tensor, path: str | os.PathLike, offset: int, op: str) -> int:
        address, nbytes = _as_buffer(tensor, op)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"{op}: offset must be an int >= 0, got {offset!r}")
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"{op}: path must be a str or os.PathLike of str, got {path!r}")
        request_id, error = self._engine.submit(read, address, nbytes, path, offset)
        if request_id == 0:
            raise _error(error, op)
        self._live[request_id] = tensor  # the memory must outlive the request
        return request_id

    def _run(self, request_id: int) -> int:
        result = self._engine.wait_one(request_id)
        self._live.pop(request_id, None)
        if result[5] != 0:
            raise _error(result)
        return 1


def _ds_async_args(op: str, args: tuple, kwargs: dict) -> tuple[bool, int]:
    """DeepSpeed's ``async`` (a Python keyword, so positional or ``**{"async": ...}``) and ``file_offset``."""
    names = ["async", "file_offset"]
    values: dict[str, Any] = {"async": False, "file_offset": 0}
    if len(args) > len(names):
        raise TypeError(f"{op}: too many arguments")
    values.update(zip(names, args, strict=False))
    for key, value in kwargs.items():
        key = "async" if key in ("async_op", "is_async") else key
        if key not in values:
            raise TypeError(f"{op}: unexpected argument {key!r} (accepted: async, file_offset)")
        values[key] = value
    return bool(values["async"]), int(values["file_offset"])


class aio_handle(AsyncIOHandle):  # DeepSpeed's name
    """DeepSpeed's ``aio_handle(block_size=1MiB, queue_depth=128, single_submit=False,
    overlap_events=False, intra_op_parallelism=1)``: ``AsyncIOHandle`` with DeepSpeed's defaults and
    return values (``async_pread``/``async_pwrite`` return 0; ``wait()`` the count completed)."""

    def __init__(
        self,
        block_size: int = 1 << 20,
        queue_depth: int = 128,
        single_submit: bool = False,
        overlap_events: bool = False,
        intra_op_parallelism: int = 1,
    ) -> None:
        super().__init__(block_size, queue_depth, single_submit, overlap_events, intra_op_parallelism)

    def async_pread(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int:  # type: ignore[override]
        """Start a read; returns 0 as DeepSpeed does (``wait()`` collects it)."""
        super().async_pread(buffer, filename, file_offset)
        return 0

    def async_pwrite(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int:  # type: ignore[override]
        """Start a write; returns 0 as DeepSpeed does (``wait()`` collects it)."""
        super().async_pwrite(buffer, filename, file_offset)
        return 0


class AsyncIOBuilder:
    """Stand-in for DeepSpeed's ``deepspeed.ops.op_builder.AsyncIOBuilder``: nothing to compile.

    ``AsyncIOBuilder().load().aio_handle(...)`` gives an ``aio_handle``.
    """

    NAME = "async_io"

    def is_compatible(self, verbose: bool = False) -> bool:
        """True: the engine is compiled in (the thread-pool backend works everywhere)."""
        return True

    def load(self, verbose: bool = True) -> types.SimpleNamespace:
        """The 'op module': a namespace with ``aio_handle``."""
        return types.SimpleNamespace(aio_handle=aio_handle)


__all__ = [
    "ALIGNMENT",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_QUEUE_DEPTH",
    "AsyncIOBuilder",
    "AsyncIOHandle",
    "aio_handle",
    "aligned_empty",
    "backend_report",
    "backends",
    "default_backend",
]
