"""ds_native.aio: exact round trips on every usable backend, checked against plain Python file IO,
and every failure a clear OSError with nothing reported as success.

The full and read-only filesystem cases mount a small tmpfs, so they need root (CI runs them as
root); elsewhere they skip and say why. An execution-time failure that needs no privilege comes from
RLIMIT_FSIZE in a subprocess (writes past the limit fail with EFBIG).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import ds_native
from ds_native import aio, memory

pytestmark = pytest.mark.timeout(120)

REPORT = {b["name"]: b for b in aio.backend_report()}
BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(not REPORT[name]["usable"], reason=f"{name}: {REPORT[name]['reason']}"),
    )
    for name in ("io_uring", "libaio", "threadpool")
]
BLOCK = 64 << 10  # small blocks so that modest sizes still make many blocks


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _buffer(data: torch.Tensor, kind: str) -> torch.Tensor:
    """The same bytes in memory that is 4 KiB-aligned, torch's own, or deliberately misaligned."""
    n = data.numel()
    if kind == "aligned":
        out = aio.aligned_empty(n)
    elif kind == "misaligned":
        out = aio.aligned_empty(n + 3)[3:]
    else:
        out = torch.empty(n, dtype=torch.uint8)
    return out.copy_(data)


# (size, offset): empty, tiny, around one page, around one block, many blocks, unaligned everything.
CASES = [(0, 0), (1, 0), (1, 4095), (4095, 1), (4096, 0), (4097, 4096), (BLOCK - 1, 7), (BLOCK + 1, 0)]
CASES += [(3 * BLOCK + 4096, 8192), (5 * BLOCK + 123, 4093), (1 << 20, 12345)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trips_at_odd_sizes_and_offsets_match_python_io(backend: str, tmp_path: Path) -> None:
    h = aio.AsyncIOHandle(block_size=BLOCK, queue_depth=4, backend=backend)
    assert h.backend == backend
    for i, (size, offset) in enumerate(CASES):
        kind = ("aligned", "torch", "misaligned")[i % 3]
        data = _random_bytes(size, seed=i)
        path = tmp_path / f"case{i}.bin"
        # Bytes around the range exist already and must survive the write untouched.
        before = _random_bytes(offset + size + 5000, seed=500 + i).numpy().tobytes()
        path.write_bytes(before)
        request = h.async_pwrite(_buffer(data, kind), path, offset)
        assert isinstance(request, int) and request > 0
        assert h.wait() == 1
        expected = before[:offset] + data.numpy().tobytes() + before[offset + size :]
        assert path.read_bytes() == expected, f"case {i}: size {size} offset {offset} ({kind} buffer)"

        # The other way: Python writes, we read into every kind of buffer.
        fresh = _random_bytes(size, seed=1000 + i)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(fresh.numpy().tobytes())
        for out_kind in ("aligned", "torch", "misaligned"):
            out = _buffer(torch.zeros(size, dtype=torch.uint8), out_kind)
            assert h.sync_pread(out, path, offset) == 1
            assert torch.equal(out, fresh), f"case {i}: read into {out_kind} buffer"


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_files_are_created_with_the_exact_size(backend: str, tmp_path: Path) -> None:
    h = aio.AsyncIOHandle(block_size=BLOCK, queue_depth=2, backend=backend)
    for size, offset in [(0, 0), (10, 0), (4096 * 3 + 1, 0), (BLOCK * 2 + 17, 4096), (100, 5000)]:
        path = tmp_path / f"new_{size}_{offset}.bin"
        data = _random_bytes(size, seed=size)
        h.sync_pwrite(data, str(path), offset)
        assert path.stat().st_size == offset + size  # never padded to a block or a page
        assert path.read_bytes()[offset:] == data.numpy().tobytes()
        assert path.read_bytes()[:offset] == bytes(offset)  # the hole reads as zeros


@pytest.mark.parametrize(
    "options",
    [
        {"queue_depth": 4, "intra_op_parallelism": 2},
        {"queue_depth": 3, "single_submit": True},
        {"queue_depth": 8, "overlap_events": False},
        {"queue_depth": 2, "use_direct": False},
    ],
    ids=["parallel", "single_submit", "lockstep", "buffered"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_concurrent_requests(backend: str, options: dict, tmp_path: Path) -> None:
    h = aio.AsyncIOHandle(block_size=BLOCK, backend=backend, **options)
    rng = random.Random(7)
    tensors, plan, offset = [], [], 0
    for i in range(48):
        size = rng.choice([1, 4096, 5000, BLOCK, 3 * BLOCK + 11, 200_000])
        path = tmp_path / f"f{i % 3}.bin"  # three files, many regions each
        data = _random_bytes(size, seed=i)
        tensors.append(data)
        plan.append((path, offset, size))
        offset += size + rng.choice([0, 1, 4096])
    ids = {h.async_pwrite(t, p, o) for t, (p, o, _) in zip(tensors, plan, strict=True)}
    assert len(ids) == len(plan)  # distinct request ids
    assert h.wait() == len(plan)
    assert h.wait() == 0  # nothing left
    contents = {p: p.read_bytes() for p in {p for p, _, _ in plan}}
    for t, (p, o, n) in zip(tensors, plan, strict=True):
        assert contents[p][o : o + n] == t.numpy().tobytes()
    outs = [aio.aligned_empty(n) if i % 2 else torch.empty(n, dtype=torch.uint8) for i, (_, _, n) in enumerate(plan)]
    for out, (p, o, _) in zip(outs, plan, strict=True):
        h.async_pread(out, p, o)
    assert h.wait() == len(plan)
    for out, t in zip(outs, tensors, strict=True):
        assert torch.equal(out, t)


def test_float_tensors_and_pathlike(tmp_path: Path) -> None:
    h = aio.AsyncIOHandle()
    x = torch.randn(12_345, dtype=torch.float32)
    h.sync_pwrite(x, tmp_path / "x.pt")
    y = aio.aligned_empty(12_345, torch.float32)
    h.sync_pread(y, tmp_path / "x.pt")
    assert torch.equal(x, y)
    b = torch.randn(7, 9).to(torch.bfloat16)
    h.sync_pwrite(b, tmp_path / "b.bin", offset=3)
    c = torch.empty(7, 9, dtype=torch.bfloat16)
    h.sync_pread(c, tmp_path / "b.bin", offset=3)
    assert torch.equal(b, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_past_the_end_is_an_error(backend: str, tmp_path: Path) -> None:
    h = aio.AsyncIOHandle(block_size=BLOCK, backend=backend)
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 10_000)
    for size, offset in [(10_001, 0), (1, 10_000), (BLOCK, 4096), (100, 9_950)]:
        out = torch.zeros(size, dtype=torch.uint8)
        with pytest.raises(OSError) as info:
            h.async_pread(out, path, offset)
        e = info.value
        assert e.errno == errno.ENODATA and e.filename == str(path)
        assert (e.offset, e.nbytes, e.op) == (offset, size, "read")
        assert f"{size} bytes at offset {offset}" in str(e) and "file has 10000" in str(e)
        assert h.outstanding() == 0 and h.wait() == 0  # nothing was queued
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        h.sync_pread(torch.zeros(4, dtype=torch.uint8), tmp_path / "missing.bin")
    # A read queued while this handle still writes the file is checked when it runs: still an error.
    big = torch.zeros(4 * BLOCK, dtype=torch.uint8)
    h.async_pwrite(torch.ones(100, dtype=torch.uint8), path, 0)
    try:
        h.async_pread(big, path, 0)
    except OSError as e:  # the write finished before the read was queued
        assert e.errno == errno.ENODATA
        assert h.wait() == 1
    else:
        with pytest.raises(OSError, match="file ends at byte 10000") as info:
            h.wait()
        assert info.value.errno == errno.ENODATA
    assert path.read_bytes() == b"\x01" * 100 + b"x" * 9_900  # the write itself succeeded


def test_bad_arguments_name_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 4096"):
        aio.AsyncIOHandle(block_size=1000)
    with pytest.raises(ValueError, match="queue_depth"):
        aio.AsyncIOHandle(queue_depth=0)
    with pytest.raises(ValueError, match="accepted: io_uring, libaio, threadpool"):
        aio.AsyncIOHandle(backend="spdk")
    h = aio.AsyncIOHandle()
    with pytest.raises(ValueError, match="contiguous"):
        h.async_pwrite(torch.zeros(4, 4).t(), tmp_path / "x")
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        h.async_pwrite(torch.zeros(4), tmp_path / "x", -1)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        h.async_pwrite(b"abc", tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alignment"):
        aio.aligned_empty(10, alignment=1000)
    h.close()
    with pytest.raises(RuntimeError, match="closed"):
        h.wait()


def test_aligned_empty() -> None:
    for dtype in (torch.uint8, torch.float32, torch.bfloat16, torch.float64):
        for n in (0, 1, 4097, 1 << 20):
            t = aio.aligned_empty(n, dtype)
            assert t.shape == (n,) and t.dtype == dtype and t.is_contiguous()
            assert t.data_ptr() % 4096 == 0
    assert aio.aligned_empty(10, alignment=1 << 16).data_ptr() % (1 << 16) == 0
    assert aio.aligned_empty(10, pin=True).is_pinned() == torch.cuda.is_available()


@pytest.mark.skipif(
    memory.thp_mode() not in ("always", "madvise") or memory.huge_page_bytes() == 0,
    reason=f"transparent huge pages are {memory.thp_mode()} on this machine",
)
def test_large_aligned_buffers_ask_for_huge_pages() -> None:
    t = aio.aligned_empty(16 << 20)
    assert t.data_ptr() % memory.huge_page_bytes() == 0
    assert memory.huge_page_advised_bytes(t) == 16 << 20  # the whole buffer carries the advice
    assert memory.huge_page_advised_bytes(aio.aligned_empty(16 << 20, huge_pages=False)) == 0
    assert aio.aligned_empty(1 << 20).data_ptr() % 4096 == 0  # small ones: plain pages


def test_backends_are_reported() -> None:
    names = [b["name"] for b in aio.backend_report()]
    assert names == ["io_uring", "libaio", "threadpool"]
    assert "threadpool" in aio.backends() and aio.default_backend() == aio.backends()[0]
    info = ds_native.build_info()
    assert info["io_backends_usable"] == aio.backends()
    assert set(info["io_backends_usable"]) <= set(info["io_backends"])
    for b in aio.backend_report():
        assert b["compiled"] == (b["name"] in info["io_backends"])
        assert b["usable"] or b["reason"]  # never unusable without saying why
    if os.environ.get("CI") and sys.platform == "linux":
        # CI installs liburing-dev (.ci/apt-packages.txt): the io_uring backend must be built there.
        assert "io_uring" in info["io_backends"]


def test_forced_backend_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_NATIVE_AIO_BACKEND", "threadpool")
    assert aio.default_backend() == "threadpool" and aio.AsyncIOHandle().backend == "threadpool"
    monkeypatch.setenv("DS_NATIVE_AIO_BACKEND", "nope")
    with pytest.raises(ValueError, match="DS_NATIVE_AIO_BACKEND"):
        aio.AsyncIOHandle()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gil_is_released_while_waiting(backend: str, tmp_path: Path) -> None:
    h = aio.AsyncIOHandle(block_size=1 << 20, queue_depth=4, backend=backend)
    data = aio.aligned_empty(48 << 20).fill_(3)
    path = tmp_path / "big.bin"
    h.sync_pwrite(data, path)
    done = threading.Event()

    def waiter() -> None:
        for _ in range(3):
            h.sync_pread(data, path)
            h.sync_pwrite(data, path)
        done.set()

    t = threading.Thread(target=waiter)
    ticks = 0
    t.start()
    while not done.is_set():
        ticks += 1  # runs only if the waiting thread let go of the GIL
    t.join()
    assert ticks > 1000


def test_deepspeed_aliases(tmp_path: Path) -> None:
    op = aio.AsyncIOBuilder().load()
    assert aio.AsyncIOBuilder().is_compatible()
    h = op.aio_handle(1 << 20, 8, False, True, 2)
    assert (h.get_block_size(), h.get_queue_depth(), h.get_single_submit(), h.get_overlap_events()) == (
        1 << 20,
        8,
        False,
        True,
    )
    assert h.get_intra_op_parallelism() == 2 == h.get_thread_count() and h.get_alignment() == 4096
    assert aio.aio_handle().get_queue_depth() == 128  # DeepSpeed's defaults
    buf = h.new_cpu_locked_tensor(5000, torch.empty(0, dtype=torch.float16))
    assert buf.dtype == torch.float16 and buf.numel() == 5000
    buf.copy_(torch.randn(5000))
    path = str(tmp_path / "ds.swp")
    assert h.async_pwrite(buf, path) == 0  # DeepSpeed returns 0, then wait() counts
    assert h.wait() == 1
    back = torch.empty_like(buf)
    assert h.pread(back, path, False, True) == 0 and h.wait() == 1
    assert torch.equal(back, buf)
    assert h.sync_pread(back, path, 0) == 1 and h.read(back, path, False) == 1
    assert h.pwrite(buf, path, False, False, 10) == 1 and h.write(buf, path, True, 20) == 1
    with open(path, "rb") as f:
        f.seek(20)
        assert f.read() == buf.numpy().tobytes()
    h.free_cpu_locked_tensor(buf)


# --- failures while requests run -------------------------------------------------------------

_FSIZE_SCRIPT = textwrap.dedent(
    """
    import errno, os, resource, signal, sys, torch
    from ds_native import aio
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    for backend in sys.argv[2:]:  # one process for every backend: starting torch is the slow part
        d = os.path.join(sys.argv[1], backend)
        os.mkdir(d)
        h = aio.AsyncIOHandle(block_size=64 << 10, queue_depth=4, backend=backend)
        good = torch.randint(0, 256, (300_000,), dtype=torch.uint8)
        h.async_pwrite(good, d + "/good.bin")
        h.async_pwrite(torch.ones(3 << 20, dtype=torch.uint8), d + "/big.bin")
        h.async_pwrite(good, d + "/good2.bin", 4096)
        try:
            h.wait()
        except OSError as e:
            assert e.errno == errno.EFBIG, e
            assert e.filename.endswith("big.bin") and e.nbytes == 3 << 20 and e.offset == 0, e
            assert e.fail_offset >= (1 << 20) - (64 << 10), e
            print(backend, "raised:", e)
        else:
            raise SystemExit("a failed write reported success")
        assert h.outstanding() == 0 and h.wait() == 0
        assert open(d + "/good.bin", "rb").read() == good.numpy().tobytes()
        assert open(d + "/good2.bin", "rb").read()[4096:] == good.numpy().tobytes()
        h.sync_pwrite(good, d + "/after.bin")  # the handle still works
    print("ok")
    """
)


def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past 1 MiB fail with EFBIG while they run, on every usable backend:
    the request raises from wait() naming the file, offset and size, the requests around it
    complete, nothing hangs."""
    usable = aio.backends()
    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path), *usable], capture_output=True, text=True, timeout=100
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
    for backend in usable:
        assert f"{backend} raised: [Errno 27]" in out.stdout


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs this as root)")
    where.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")


@pytest.fixture
def small_fs(tmp_path: Path):
    where = tmp_path / "small"
    _mount_tmpfs(where, "size=1m")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_filesystem_is_enospc(backend: str, small_fs: Path, tmp_path: Path) -> None:
    h = aio.AsyncIOHandle(block_size=BLOCK, queue_depth=4, backend=backend)
    keep = _random_bytes(200_000, seed=1)
    h.async_pwrite(keep, tmp_path / "elsewhere.bin")  # same batch, another filesystem
    h.async_pwrite(torch.ones(4 << 20, dtype=torch.uint8), small_fs / "full.bin", 4096)
    with pytest.raises(OSError) as info:
        h.wait()
    e = info.value
    assert e.errno == errno.ENOSPC and e.filename == str(small_fs / "full.bin")
    assert (e.op, e.offset, e.nbytes) == ("write", 4096, 4 << 20)
    assert "No space left on device" in str(e) and "4194304 bytes at offset 4096" in str(e)
    assert (tmp_path / "elsewhere.bin").read_bytes() == keep.numpy().tobytes()
    assert h.outstanding() == 0 and h.wait() == 0
    os.remove(small_fs / "full.bin")
    h.sync_pwrite(keep, small_fs / "fits.bin")  # space again: the handle works
    assert (small_fs / "fits.bin").read_bytes() == keep.numpy().tobytes()


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory writes are refused in: a read-only tmpfs as root (root ignores permission bits),
    a chmod 0555 directory otherwise."""
    where = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(where, "size=1m")
        (where / "existing.bin").write_bytes(b"y" * 5000)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        try:
            yield where, errno.EROFS
        finally:
            subprocess.run(["umount", str(where)], check=False)
    else:
        where.mkdir()
        (where / "existing.bin").write_bytes(b"y" * 5000)
        (where / "existing.bin").chmod(0o444)
        where.chmod(0o555)
        try:
            yield where, errno.EACCES
        finally:
            where.chmod(0o755)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_directory(backend: str, read_only_dir: tuple[Path, int]) -> None:
    where, code = read_only_dir
    h = aio.AsyncIOHandle(block_size=BLOCK, backend=backend)
    for name in ("new.bin", "existing.bin"):
        with pytest.raises(OSError) as info:
            h.async_pwrite(torch.ones(10_000, dtype=torch.uint8), where / name)
        assert info.value.errno == code and info.value.filename == str(where / name)
        assert "10000 bytes at offset 0" in str(info.value)
    assert h.outstanding() == 0 and not (where / "new.bin").exists()
    assert (where / "existing.bin").read_bytes() == b"y" * 5000
    out = torch.zeros(5000, dtype=torch.uint8)
    h.sync_pread(out, where / "existing.bin")  # reading is still fine
    assert bytes(out.numpy()) == b"y" * 5000


def _direct_io_supported(directory: Path) -> bool:
    probe = directory / "odirect.probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_io_bypasses_the_page_cache(backend: str, tmp_path: Path) -> None:
    """With use_direct (the default) the aligned part never enters the page cache; without it, it does.
    Checked with util-linux's fincore (the page-cache residency of a file)."""
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")
    if not _direct_io_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} has no O_DIRECT")

    def cached_pages(path: Path) -> int:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(path)], capture_output=True, text=True
        )
        return int(out.stdout.split()[0])

    data = aio.aligned_empty(8 << 20).copy_(_random_bytes(8 << 20, seed=3))
    direct, buffered = tmp_path / "direct.bin", tmp_path / "buffered.bin"
    aio.AsyncIOHandle(backend=backend).sync_pwrite(data, direct)
    aio.AsyncIOHandle(backend=backend, use_direct=False).sync_pwrite(data, buffered)
    back = aio.aligned_empty(8 << 20)
    aio.AsyncIOHandle(backend=backend).sync_pread(back, direct)
    assert torch.equal(back, data)
    assert cached_pages(direct) == 0
    assert cached_pages(buffered) > (8 << 20) // 4096 // 2  # (memory pressure may evict a few)
