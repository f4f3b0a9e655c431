"""Run a test function in N real processes on torch.distributed (gloo).

Why processes and not threads: the code under test calls torch.distributed
exactly as it will in production, so collectives, process groups and
per-process state are real. Why a forkserver with torch preloaded: spawning
each rank from scratch re-imports torch (seconds per rank on 2 cores), and
forking the pytest process itself is unsafe once it has started threads.

Failure handling is the point of this module:
- a rank that raises: every rank is stopped and the error shows that rank's
  traceback;
- a rank that hangs: at the timeout every live rank dumps its Python stack
  (faulthandler on SIGUSR1), the stacks go into the error, and every rank's
  whole process group is killed, so no child survives the test.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from zero_testkit.timeouts import ENV, max_scale, timeout_scale

_CTX: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        # torch._dynamo: the first optimizer construction in a process imports it (seconds).
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo"])
        _CTX = ctx
    return _CTX


class DistributedTestError(AssertionError):
    """One or more ranks failed or timed out; the message holds their tracebacks."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    port: int,
    backend: str,
    init: bool,
    stack_file: str,
    results: Any,
    pg_timeout: float,
) -> None:
    # Own process group, so the parent can kill this rank and anything it starts.
    os.setpgrp()
    with open(stack_file, "w") as stacks:
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            LOCAL_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        try:
            if init:
                # Longer than the whole test may take: a collective that is slow under load is
                # never cut short; a hang is caught by the parent's deadline, with stacks.
                dist.init_process_group(
                    backend,
                    rank=rank,
                    world_size=world_size,
                    init_method=f"tcp://127.0.0.1:{port}",
                    timeout=timedelta(seconds=pg_timeout),
                )
            value = fn(rank, world_size, *args, **kwargs)
            results.put((rank, "ok", value))
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            results.put((rank, "error", traceback.format_exc()))
        finally:
            if init and dist.is_initialized():
                # Teardown after a failure may fail too; the failure is already reported.
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()


def _kill_all(procs: list[Any]) -> None:
    for p in procs:
        if p.pid is None:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.join(timeout=5)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
    init_process_group: bool = True,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return each rank's result.

    ``fn`` must be importable by name (a module-level function) and its
    arguments and return value picklable. Each rank sees RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR and MASTER_PORT as a
    launcher would set them. With ``init_process_group=False`` the process
    group is left for ``fn`` to create (e.g. from the environment).

    Raises DistributedTestError with every failed rank's traceback when a rank
    raises, exits abnormally, or the whole run exceeds ``timeout`` seconds times
    the load scale (then with the stack of every rank still running). No child
    process survives.
    """
    ctx = _context()
    results = ctx.SimpleQueue()
    port = free_port()
    # torch's default (30 min for gloo) or more: never shorter than this run's largest deadline.
    pg_timeout = max(1800.0, timeout * max_scale() + 60.0)
    with tempfile.TemporaryDirectory(prefix="zero_testkit_") as tmp:
        stack_files = [str(Path(tmp) / f"rank{r}.stack") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(
                    fn,
                    r,
                    world_size,
                    args,
                    kwargs,
                    port,
                    backend,
                    init_process_group,
                    stack_files[r],
                    results,
                    pg_timeout,
                ),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outcome: dict[int, tuple[str, Any]] = {}
        deadline = _Deadline(timeout)
        try:
            failure = _wait(procs, results, outcome, deadline)
            if failure is None:
                return [outcome[r][1] for r in range(world_size)]
            if failure == "timeout":
                _dump_stacks(procs, outcome)
            _kill_all(procs)
            raise DistributedTestError(_report(fn, world_size, deadline, failure, procs, outcome, stack_files))
        finally:
            _kill_all(procs)


class _Deadline:
    """``timeout`` seconds times the largest load scale seen since the start."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.start = time.monotonic()
        self.scale = timeout_scale()
        self._next_read = self.start + 1.0

    def passed(self) -> bool:
        now = time.monotonic()
        if now >= self._next_read:  # the load average changes slowly: once a second is plenty
            self.scale = max(self.scale, timeout_scale())
            self._next_read = now + 1.0
        return now - self.start > self.timeout * self.scale

    def describe(self) -> str:
        elapsed = time.monotonic() - self.start
        return (
            f"timed out after {elapsed:.0f}s (timeout {self.timeout:.0f}s x load scale {self.scale:.2g}; "
            f"set {ENV} to change the scale)"
        )


def _drain(results: Any, outcome: dict[int, tuple[str, Any]]) -> None:
    while not results.empty():
        rank, status, value = results.get()
        outcome[rank] = (status, value)


def _wait(procs: list[Any], results: Any, outcome: dict[int, tuple[str, Any]], deadline: _Deadline) -> str | None:
    """Poll until every rank reported, one failed, or time ran out."""
    while True:
        _drain(results, outcome)
        if any(status == "error" for status, _ in outcome.values()):
            # Give the other ranks a moment to report their own errors too.
            time.sleep(0.5)
            _drain(results, outcome)
            return "error"
        if len(outcome) == len(procs):
            for p in procs:
                p.join(timeout=10)
            return None
        for rank, p in enumerate(procs):
            if rank not in outcome and p.exitcode is not None:
                time.sleep(0.2)  # its result may still be in flight
                _drain(results, outcome)
                if rank not in outcome:
                    return "exit"
        if deadline.passed():
            return "timeout"
        time.sleep(0.02)


def _dump_stacks(procs: list[Any], outcome: dict[int, tuple[str, Any]]) -> None:
    for rank, p in enumerate(procs):
        if rank not in outcome and p.exitcode is None and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGUSR1)
    time.sleep(1.0)


def _report(
    fn: Callable[..., Any],
    world_size: int,
    deadline: _Deadline,
    failure: str,
    procs: list[Any],
    outcome: dict[int, tuple[str, Any]],
    stack_files: list[str],
) -> str:
    name = getattr(fn, "__qualname__", repr(fn))
    if failure == "timeout":
        head = f"{name} on {world_size} ranks {deadline.describe()}"
    else:
        head = f"{name} failed on {world_size} ranks"
    lines = [head]
    for rank, p in enumerate(procs):
        status, value = outcome.get(rank, (None, None))
        if status == "ok":
            lines.append(f"--- rank {rank}: finished")
        elif status == "error":
            lines.append(f"--- rank {rank}: raised\n{value}")
        elif failure == "timeout":
            stack = Path(stack_files[rank]).read_text() if Path(stack_files[rank]).exists() else ""
            lines.append(f"--- rank {rank}: still running at the timeout; its stack:\n{stack or '(no stack dumped)'}")
        else:
            lines.append(f"--- rank {rank}: exited with code {p.exitcode} without a result")
    return "\n".join(lines)
