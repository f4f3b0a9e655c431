"""The distributed test helper's own tests: pass, raise, hang, exit."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from zero_testkit import DistributedTestError, run_distributed


def _all_reduce_rank_sum(rank: int, world_size: int) -> list[float]:
    t = torch.tensor([float(rank + 1), 10.0 * rank])
    dist.all_reduce(t)
    return t.tolist()


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # rank 0 waits here; the helper must not wait for it


def _hang_on_rank_one(rank: int, world_size: int, pid_dir: str) -> None:
    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        while True:
            time.sleep(0.1)  # the hang the helper must report: in _hang_on_rank_one
    dist.barrier()


def _exit_hard(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(7)
    dist.barrier()


def _env_of_rank(rank: int, world_size: int) -> dict[str, str]:
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    dist.init_process_group("gloo")  # from the environment, as a launched script does
    try:
        dist.barrier()
        return {k: os.environ[k] for k in keys}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_all_reduce_sums_over_ranks(world_size: int) -> None:
    results = run_distributed(_all_reduce_rank_sum, world_size, timeout=60)
    expected = [float(sum(r + 1 for r in range(world_size))), 10.0 * sum(range(world_size))]
    assert results == [expected] * world_size


def test_raising_rank_fails_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank_one, 2, timeout=30)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "rank 1: raised" in message
    assert "ValueError: boom from rank one" in message


def test_hanging_rank_times_out_with_stack_and_leaves_no_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ZERO_TESTKIT_TIMEOUT_SCALE", "1")  # exactly the written limit, whatever the load
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hang_on_rank_one, 2, str(tmp_path), timeout=8)
    elapsed = time.monotonic() - start
    assert elapsed < 8 + 15, elapsed
    message = str(info.value)
    assert "timed out after" in message and "(timeout 8s x load scale 1;" in message
    assert "_hang_on_rank_one" in message  # the hung rank's own stack
    for pid_file in tmp_path.glob("*.pid"):
        pid = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_rank_exiting_without_result_is_reported() -> None:
    with pytest.raises(DistributedTestError, match="rank 0: exited with code 7"):
        run_distributed(_exit_hard, 2, timeout=30)


def test_launcher_environment_lets_fn_init_from_env() -> None:
    envs = run_distributed(_env_of_rank, 2, init_process_group=False, timeout=60)
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert all(e["WORLD_SIZE"] == "2" and e["MASTER_ADDR"] == "127.0.0.1" for e in envs)
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]


def test_timeout_scale_from_env_lengthens_the_deadline(tmp_path, monkeypatch) -> None:
    """A hang still fails, after timeout x scale, with the stack."""
    monkeypatch.setenv("ZERO_TESTKIT_TIMEOUT_SCALE", "2.5")
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_hang_on_rank_one, 2, str(tmp_path), timeout=2)
    assert 5 <= time.monotonic() - start < 5 + 15
    assert "(timeout 2s x load scale 2.5;" in str(info.value) and "_hang_on_rank_one" in str(info.value)


def test_timeout_scale_follows_load_per_core(monkeypatch) -> None:
    from zero_testkit import timeouts

    monkeypatch.delenv("ZERO_TESTKIT_TIMEOUT_SCALE", raising=False)
    monkeypatch.setattr(timeouts.os, "sched_getaffinity", lambda pid: {0, 1})
    for load, want in [(0.3, 1.0), (2.0, 1.0), (5.0, 2.5), (40.0, timeouts.MAX_AUTO_SCALE)]:
        monkeypatch.setattr(timeouts.os, "getloadavg", lambda load=load: (load, load, load))
        assert timeouts.timeout_scale() == pytest.approx(want)
    assert timeouts.max_scale() == timeouts.MAX_AUTO_SCALE
    monkeypatch.setenv("ZERO_TESTKIT_TIMEOUT_SCALE", "1")
    assert timeouts.timeout_scale() == 1.0 and timeouts.max_scale() == 1.0
    monkeypatch.setenv("ZERO_TESTKIT_TIMEOUT_SCALE", "fast")
    with pytest.raises(ValueError, match="ZERO_TESTKIT_TIMEOUT_SCALE='fast': expected a positive number"):
        timeouts.timeout_scale()


def test_pytest_timeout_marks_are_scaled(tmp_path) -> None:
    """The plugin multiplies pytest-timeout's limits, so the helper's deadline (with stacks) comes first."""
    import subprocess
    import sys

    (tmp_path / "test_marks.py").write_text(
        "import pytest\n"
        "@pytest.mark.timeout(5)\n"
        "def test_mark(request):\n"
        "    assert request.node.get_closest_marker('timeout').kwargs['timeout'] == 15\n"
        "def test_ini(request):\n"
        "    assert request.config._env_timeout == 21\n"
    )
    env = dict(os.environ, ZERO_TESTKIT_TIMEOUT_SCALE="3")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=7", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
