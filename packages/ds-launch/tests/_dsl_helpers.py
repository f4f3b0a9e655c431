"""Helpers shared by the ds-launch tests: the test worker script, free ports, process checks.

(A uniquely named module rather than conftest.py, so that running several packages' tests in
one pytest session cannot import another package's helpers.)
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

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
