"""The IO fallback, the buffer pool, scratch directories and the tensor swapper, against plain tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offload_io import AioConfig, OffloadOptimizerConfig
from offload_io.buffers import BufferPool, PoolExhaustedError
from offload_io.io import SwapIOError, ThreadPoolHandle, aligned_empty, open_handle
from offload_io.optimizer_state import SwappedOptimizerState
from offload_io.scratch import ROOT_NAME, ScratchDir
from offload_io.swapper import TensorSwapper


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_thread_pool_round_trip_odd_sizes_and_offsets(tmp_path: Path, dtype: torch.dtype) -> None:
    h = ThreadPoolHandle(block_size=4096, intra_op_parallelism=3)
    g = torch.Generator().manual_seed(0)
    path = str(tmp_path / "f.bin")
    written = []
    offset = 0
    for numel in (1, 777, 4096, 100_003):
        t = (torch.rand(numel, generator=g) * 100).to(dtype)
        h.async_pwrite(t, path, offset)
        written.append((t, offset))
        offset += t.numel() * t.element_size() + 13  # odd gaps: unaligned offsets
    assert h.wait() > 4  # the large one was split across the threads
    for t, off in written:
        back = torch.empty_like(t)
        h.sync_pread(back, path, off)
        assert torch.equal(back, t)
    h.close()


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    h = open_handle(AioConfig(block_size=4096), prefer_native=False)
    missing = tmp_path / "nope.swp"
    with pytest.raises(SwapIOError, match=r"nope\.swp"):
        h.sync_pread(torch.empty(10), str(missing))
    short = tmp_path / "short.swp"
    short.write_bytes(b"\0" * 12)
    with pytest.raises(SwapIOError, match=r"short\.swp.*offset 12"):
        h.sync_pread(torch.empty(10), str(short))  # 40 bytes asked, 12 there: never a partial success
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only directory is writable")
        with pytest.raises(SwapIOError, match="cannot open for writing"):
            h.sync_pwrite(torch.ones(4), str(ro / "x.swp"))
    finally:
        ro.chmod(0o700)


def test_aligned_empty_and_pool_bound() -> None:
    t = aligned_empty(1000, torch.bfloat16, alignment=4096)
    assert t.data_ptr() % 4096 == 0 and t.numel() == 1000 and t.dtype == torch.bfloat16
    pool = BufferPool(2, 64)
    a, b = pool.acquire(10), pool.acquire(64)
    assert a.data_ptr() % 4096 == 0 and b.data_ptr() % 4096 == 0
    with pytest.raises(PoolExhaustedError):
        pool.acquire(1)
    pool.release(a)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(a)
    with pytest.raises(ValueError, match="buffers hold 64"):
        pool.acquire(65)


def test_scratch_removed_at_exit_and_stale_after_crash(tmp_path: Path) -> None:
    code = (
        "import os, sys; from offload_io.scratch import ScratchDir; s = ScratchDir(sys.argv[1]); "
        "s.file('a.swp').write_bytes(b'x'); print(s.path, flush=True); "
        "os._exit(0) if sys.argv[2] == 'crash' else None"
    )
    clean = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "exit"], capture_output=True, text=True, timeout=120
    )
    assert clean.returncode == 0, clean.stderr
    assert not Path(clean.stdout.strip()).exists()  # removed at interpreter exit
    crash = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "crash"], capture_output=True, text=True, timeout=120
    )
    left = Path(crash.stdout.strip())
    assert left.exists() and (left / "a.swp").exists()  # a hard exit leaves it behind...
    live = ScratchDir(tmp_path)  # ...and the next start removes it, but not a live one
    assert left in live.removed_stale and not left.exists()
    other = ScratchDir(tmp_path)
    assert live.path.exists() and live.path not in other.removed_stale
    other.cleanup()
    live.cleanup()
    assert sorted((tmp_path / ROOT_NAME).iterdir()) == []


def test_swapper_prefetch_write_back_and_missing_file(tmp_path: Path) -> None:
    scratch = ScratchDir(tmp_path)
    pool = BufferPool(3, 1024)  # 900-904 fp32 elements pad to 1024 (4 KiB): whole O_DIRECT blocks
    sw = TensorSwapper(scratch, pool, ThreadPoolHandle(), ThreadPoolHandle())
    values = {f"t{i}": torch.randn(900 + i) for i in range(5)}
    for k, v in values.items():
        sw.register(k, v.numel())
        sw.new(k).copy_(v)
        sw.write_back(k)  # more tensors than buffers: writes are waited for when a buffer is needed
    sw.prefetch("t0")
    sw.prefetch("t1")
    for k in values:
        got = sw.fetch(k)
        assert torch.equal(got, values[k])
        got.add_(1)
        sw.write_back(k)
    for k in values:
        assert torch.equal(sw.fetch(k), values[k] + 1)
        sw.discard(k)
    assert pool.free + len(sw._writing) == pool.count
    sw.flush()
    os.remove(sw.path("t3"))
    with pytest.raises(SwapIOError, match=r"t3\.swp of t3 is missing"):
        sw.fetch("t3")
    Path(sw.path("t4")).write_bytes(b"\0" * 8)
    with pytest.raises(SwapIOError, match="truncated"):
        sw.fetch("t4")
    scratch.cleanup()


@pytest.mark.parametrize("overlap", [True, False])
def test_swapped_state_sweep_matches_in_memory_update(tmp_path: Path, overlap: bool) -> None:
    cfg = OffloadOptimizerConfig(device="nvme", nvme_path=tmp_path, buffer_count=4)
    sizes = [500, 123, 500, 7]
    state = SwappedOptimizerState(cfg, sizes, overlap=overlap)
    assert state.pool.count == 6  # max(buffer_count, 2 x 3 states): the current piece and the next one
    ref = []
    for pid, n in enumerate(sizes):
        m = torch.randn(n)
        state.write_piece(pid, {"master": m})
        ref.append({"master": m.clone(), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)})

    def update(pid: int, t: dict[str, torch.Tensor]) -> None:
        for k in t:
            t[k].mul_(2).add_(pid)

    for _ in range(2):
        state.sweep(range(len(sizes)), update)
        for pid, r in enumerate(ref):
            for k in r:
                r[k].mul_(2).add_(pid)
    for pid, r in enumerate(ref):
        got = state.read_piece(pid)
        for k in r:
            assert torch.equal(got[k], r[k]), (pid, k)
    assert state.stats.bytes_read > 0 and state.stats.bytes_written > 0
    # Every swap file is a whole number of 4 KiB blocks (what O_DIRECT moves).
    assert all(p.stat().st_size % 4096 == 0 for p in state.scratch.path.glob("*.swp"))
    run_dir = state.scratch.path
    state.close()
    assert not run_dir.exists()
