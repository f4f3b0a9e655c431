"""Supervise the runner processes of a multi-node job (one ssh per node, or one pdsh/mpirun/srun).

Output of every process is copied through (``host: line`` for per-node processes, like
pdsh). Failure reports printed by the agents (``FAILURE_MARKER`` lines) are collected: the
first one is the root cause. As soon as one process exits non-zero — or the launcher gets
SIGINT/SIGTERM/SIGHUP — every other process is stopped:

1. its stdin is closed: over ssh the remote agent sees EOF and stops its workers;
2. it gets SIGTERM (mpirun/srun/pdsh forward it to the agents) — except ssh clients,
   which are left to carry the remote agents' last output home;
3. whatever is still running ``term_timeout + 5`` seconds later is SIGKILLed.

Agents also stop each other through the rendezvous store (see agent.py), so a failure
stops every node even when a runner cannot deliver signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from .agent import FAILURE_MARKER
from .runners import NodeCommand

__all__ = ["Failure", "supervise"]


@dataclass
class Failure:
    """The root-cause failure of a job as reported by an agent (or inferred from a runner)."""

    host: str | None
    exitcode: int
    rank: int | None = None
    local_rank: int | None = None

    @property
    def status(self) -> int:
        """Exit status for the launcher: the worker's code, or 128 + signal if it was killed."""
        return 128 - self.exitcode if self.exitcode < 0 else self.exitcode


class _Job:
    def __init__(self, commands: list[NodeCommand], prefix_hosts: bool) -> None:
        self.commands = commands
        self.prefix_hosts = prefix_hosts
        self.lock = threading.Lock()
        self.failure: Failure | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pumps: list[threading.Thread] = []

    def start(self) -> None:
        for cmd in self.commands:
            proc = subprocess.Popen(
                cmd.argv,
                env={**os.environ, **cmd.env},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not theirs
            )
            self.procs.append(proc)
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=self._pump, args=(stream, out, cmd.host), daemon=True)
                t.start()
                self.pumps.append(t)

    def _pump(self, stream: IO[bytes], out: IO[str], host: str | None) -> None:
        prefix = f"{host}: " if host and self.prefix_hosts else ""
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            idx = line.find(FAILURE_MARKER)
            if idx >= 0:
                self._record(line[idx + len(FAILURE_MARKER) :])
                continue
            try:
                out.write(prefix + line)
                out.flush()
            except (BrokenPipeError, ValueError):
                pass

    def _record(self, payload: str) -> None:
        try:
            info = json.loads(payload)
            failure = Failure(info["host"], int(info["exitcode"]), int(info["rank"]), int(info["local_rank"]))
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            if self.failure is None:
                self.failure = failure

    def stop(self, term_timeout: float, signal_runners: bool) -> None:
        for cmd, proc in zip(self.commands, self.procs, strict=True):
            if proc.poll() is not None:
                continue
            with contextlib.suppress(OSError):
                proc.stdin.close()
            if signal_runners and cmd.argv[0] != "ssh":
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + term_timeout + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def join_output(self) -> None:
        for t in self.pumps:
            t.join(timeout=5)


def supervise(
    commands: list[NodeCommand],
    term_timeout: float,
    *,
    prefix_hosts: bool = True,
    cleanup: NodeCommand | None = None,
    poll_interval: float = 0.05,
) -> int:
    """Run ``commands`` until all succeed, one fails or we are signalled; return our exit status.

    ``cleanup`` (pdsh's remote kill of this run's agents) runs after a stop that signals could
    not be relied on to deliver.
    """
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    job = _Job(commands, prefix_hosts)
    first_bad: tuple[NodeCommand, int] | None = None
    try:
        job.start()
        while True:
            codes = [p.poll() for p in job.procs]
            if stop_signal:
                break
            bad = [(c, rc) for c, rc in zip(commands, codes, strict=True) if rc not in (None, 0)]
            if bad:
                first_bad = bad[0]
                break
            if all(rc == 0 for rc in codes):
                break
            time.sleep(poll_interval)
        if stop_signal or first_bad:
            job.stop(term_timeout, signal_runners=True)
            if cleanup is not None:
                subprocess.run(cleanup.argv, env={**os.environ, **cleanup.env}, capture_output=True, timeout=30)
        job.join_output()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop_signal:
        sys.stderr.write(f"ds-launch: {signal.Signals(stop_signal[0]).name} received; stopped every node\n")
        return 128 + stop_signal[0]
    if job.failure is not None:
        f = job.failure
        sys.stderr.write(
            f"ds-launch: job failed: rank {f.rank} (local rank {f.local_rank}) on host {f.host} "
            f"exited with status {f.status}; every other worker was stopped\n"
        )
        return f.status
    if first_bad is not None:
        cmd, rc = first_bad
        where = f"on host {cmd.host}" if cmd.host else f"({cmd.argv[0]})"
        sys.stderr.write(f"ds-launch: node process {where} exited with status {rc}; every other node was stopped\n")
        return rc if rc > 0 else 128 - rc
    return 0
