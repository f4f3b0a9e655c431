"""--bind_cores_to_rank: core lists, blocks per rank, and the exec shim applied for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ds_launch._bind import cores_for_rank, parse_core_list


def test_parse_core_list() -> None:
    assert parse_core_list("1,3-5,7") == [1, 3, 4, 5, 7]
    with pytest.raises(ValueError, match="bad item 'x'"):
        parse_core_list("0,x")
    with pytest.raises(ValueError, match="bad item '3-'"):
        parse_core_list("3-")


def test_blocks_per_rank() -> None:
    cores = list(range(8))
    assert [cores_for_rank(r, 3, cores) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="4 workers but only 2 core"):
        cores_for_rank(0, 4, [0, 1])


def test_shim_binds_and_execs() -> None:
    core = sorted(os.sched_getaffinity(0))[-1]
    probe = "import json, os; print(json.dumps([sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'], os.getpid()]))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "ds_launch._bind", "0", "1", str(core), "--", sys.executable, "-c", probe]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    affinity, threads, _ = json.loads(proc.stdout)
    assert affinity == [core] and threads == "1"
