"""Shared helpers for ds-launch tests: the test worker script, free ports, process checks."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "scripts" / "worker.py"
LAUNCHER = [sys.executable, "-m", "ds_launch"]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (read from /proc, no psutil)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_reports(out_dir: Path) -> dict[int, dict]:
    """The per-rank JSON reports the test worker writes, by rank."""
    reports = {}
    for path in sorted(out_dir.glob("rank*.json")):
        data = json.loads(path.read_text())
        reports[data["rank"]] = data
    return reports


@pytest.fixture
def launcher_env() -> dict[str, str]:
    """The environment for a launcher subprocess: no stray env file, one thread per rank."""
    env = dict(os.environ)
    env.pop("DS_ENV_FILE", None)
    env["OMP_NUM_THREADS"] = "1"
    return env
