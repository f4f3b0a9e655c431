"""Real launches on this machine: ds-launch starts real gloo workers through torch's elastic agent."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _dsl_helpers import LAUNCHER, WORKER, alive, free_port, read_reports

from zero_testkit import scaled

pytestmark = pytest.mark.timeout(120)


def launch(args: list[str], env: dict[str, str], timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    """Run ds-launch to completion; returns the result and when it ended."""
    proc = subprocess.run([*LAUNCHER, *args], env=env, capture_output=True, text=True, timeout=scaled(timeout))
    return proc, time.time()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_two_rank_all_reduce(tmp_path: Path, launcher_env: dict[str, str]) -> None:
    (tmp_path / ".deepspeed_env").write_text("DSL_TEST_VALUE=a b=c $HOME 'q'\n")
    launcher_env["DS_ENV_FILE"] = str(tmp_path / ".deepspeed_env")
    args = [
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(tmp_path),
        "a b",
        "$HOME",
        "$$",
        '"q"',
    ]
    proc, _ = launch(args, launcher_env)
    assert proc.returncode == 0, proc.stderr
    reports = read_reports(tmp_path)
    assert sorted(reports) == [0, 1]
    for rank, r in reports.items():
        assert r["world_size"] == 2 and r["local_rank"] == rank and r["local_world_size"] == 2 and r["local_size"] == 2
        assert r["sum"] == 3.0
        # DeepSpeed's --local_rank=N comes first, then the user's arguments exactly as typed.
        assert r["argv"] == [f"--local_rank={rank}", str(tmp_path), "a b", "$HOME", "$$", '"q"']
        assert r["test_value"] == "a b=c $HOME 'q'"
    assert "rank 0/2 sum=3.0" in proc.stdout and "rank 1/2 sum=3.0" in proc.stdout


def test_failing_worker_stops_the_others(tmp_path: Path, launcher_env: dict[str, str]) -> None:
    # Rank 1 exits 3; rank 0 hangs in a collective AND ignores SIGTERM, so only the
    # SIGKILL after --term_timeout stops it: the bound is what is tested.
    term_timeout = 2
    args = [
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--term_timeout",
        str(term_timeout),
        "--no_local_rank",
    ]
    args += [str(WORKER), str(tmp_path), "--fail-rank", "1", "--fail-code", "3", "--ignore-term", "--spawn-child"]
    proc, end = launch(args, launcher_env)
    assert proc.returncode == 3, proc.stderr
    failed_at = float((tmp_path / "fail_time").read_text())
    # term_timeout + the monitor interval + interpreter teardown, with slack for a loaded CI machine.
    assert end - failed_at < term_timeout + 8, end - failed_at
    assert "rank 1 (local rank 1) on host localhost exited with code 3" in proc.stderr
    assert "    | rank 1 failing on purpose with code 3" in proc.stderr  # its last lines
    reports = read_reports(tmp_path)
    for r in reports.values():
        assert not alive(r["pid"]), f"rank {r['rank']} survived"
        assert not alive(r["child_pid"]), f"rank {r['rank']}'s child survived"


def test_sigterm_to_launcher_stops_every_worker(tmp_path: Path, launcher_env: dict[str, str]) -> None:
    args = ["--num_gpus", "2", "--master_port", str(free_port()), "--term_timeout", "3"]
    args += [str(WORKER), str(tmp_path), "--hang", "--spawn-child"]
    proc = subprocess.Popen(
        [*LAUNCHER, *args], env=launcher_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: len(read_reports(tmp_path)) == 2, 90, "both ranks to start")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err
    for r in read_reports(tmp_path).values():
        assert not alive(r["pid"]) and not alive(r["child_pid"])


def test_no_ssh_nodes_stop_each_other(tmp_path: Path, launcher_env: dict[str, str]) -> None:
    # Two "nodes" started separately, as a scheduler would (--no_ssh --node_rank N), with no
    # controller above them: node 1's failure must reach node 0 through the rendezvous store.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "out"
    out.mkdir()
    port = str(free_port())
    procs = []
    for node in (0, 1):
        args = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_port", port]
        args += ["--term_timeout", "2", str(WORKER), str(out), "--fail-rank", "1", "--fail-code", "5"]
        procs.append(subprocess.Popen([*LAUNCHER, *args], env=launcher_env, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=scaled(90))[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    end = time.time()
    assert procs[1].returncode == 5, errs[1]
    assert procs[0].returncode == 143, errs[0]  # stopped because another node failed
    assert "rank 1 (local rank 0) on host 127.0.0.1 exited with code 5" in errs[1]
    assert "another node failed" in errs[0]
    assert end - float((out / "fail_time").read_text()) < 2 + 8
    for r in read_reports(out).values():
        assert not alive(r["pid"])


def test_two_jobs_on_one_node_without_master_port(tmp_path: Path, launcher_env: dict[str, str]) -> None:
    """No --master_port on one node: each job takes a free port (a fixed 29500 made the second fail)."""
    launcher_env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    outs = [tmp_path / "job0", tmp_path / "job1"]
    procs = []
    for out in outs:
        out.mkdir()
        argv = [*LAUNCHER, "--num_gpus", "2", str(WORKER), str(out), "--hold", "4"]
        procs.append(
            subprocess.Popen(argv, env=launcher_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [p.communicate(timeout=scaled(100)) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    reports = [read_reports(out) for out in outs]
    for job in reports:
        assert sorted(job) == [0, 1] and all(r["world_size"] == 2 and r["sum"] == 3.0 for r in job.values())
    ports = [job[0]["master_port"] for job in reports]
    assert ports[0] != ports[1]
    # Both jobs held their port at the same time (each wrote its report before the other finished).
    assert not list((tmp_path / "tmp").glob("ds-launch-*")), "the per-run log folder was removed"
