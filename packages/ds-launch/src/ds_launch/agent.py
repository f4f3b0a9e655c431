"""The per-node agent: start this node's workers through torch's elastic agent and watch them.

One agent runs on every node (in the ``ds-launch`` process itself for a one-node run,
over ssh/pdsh/mpirun/srun otherwise). It is torch's :class:`LocalElasticAgent` with a
static rendezvous (what ``torchrun --nnodes N --node_rank R`` does), plus what the
launcher promises on top:

- worker output is copied to our stdout/stderr unprefixed (as DeepSpeed prints it) while
  the last lines of each rank are kept for the failure report;
- a failing worker is reported (rank, host, exit code, last lines) and its exit code
  becomes ours; the other workers get SIGTERM, then SIGKILL after ``term_timeout``;
- across nodes, a failure is published in the rendezvous store, and every other agent
  polls it each monitor interval and stops its workers ("[Note: cross-node abort]");
- ``--watch_stdin`` (used by the ssh runner) treats EOF on stdin as "the launcher is
  gone": the connection closed, so the agent stops its workers instead of orphaning them;
- the first stop signal stops the node and later ones cannot interrupt that stop (see
  ``_stop.py``: [Note: one-shot stop], [Note: stdin watchdog]).

Run it as ``python -m ds_launch.agent --world_info ... -- script args``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ._stop import DEFAULT_SIGNALS, StopState, kill_process_groups, watch_stdin
from ._stop import write_stderr as _write_stderr

__all__ = ["ABORTED_EXIT_CODE", "FAILURE_MARKER", "AgentConfig", "decode_world_info", "encode_world_info", "run_node"]

# A line the agent prints to stderr when one of its workers failed; a controller running
# several agents parses it to name the root-cause rank (see controller.py).
FAILURE_MARKER = "@@ds-launch-failure@@ "
# Exit status of an agent whose workers were stopped because another node failed.
ABORTED_EXIT_CODE = 143
_ABORT_KEY = "ds_launch/abort"
_DONE_KEY = "ds_launch/done/"
# This process's stop state: set once the agent stops its workers on purpose (a signal, a
# failure, an abort, the final teardown); from then on neither EOF on stdin nor a further
# signal may interrupt the shutdown and the failure report. See [Note: one-shot stop].
_STOP = StopState()
# Process group ids of this node's workers (each worker leads its own session), for the
# stdin watchdog's last resort ([Note: stdin watchdog]).
_WORKER_GROUPS: list[int] = []


def encode_world_info(world: OrderedDict[str, list[int]]) -> str:
    """``{host: slot ids}`` as urlsafe base64 JSON (DeepSpeed's ``--world_info`` format)."""
    return base64.urlsafe_b64encode(json.dumps(list(world.items())).encode()).decode()


def decode_world_info(text: str) -> OrderedDict[str, list[int]]:
    """Inverse of :func:`encode_world_info`; also accepts DeepSpeed's dict form."""
    data = json.loads(base64.urlsafe_b64decode(text.encode()).decode())
    items = data.items() if isinstance(data, dict) else data
    return OrderedDict((str(h), [int(s) for s in slots]) for h, slots in items)


@dataclass
class AgentConfig:
    """What one node needs to run its share of the job."""

    world: OrderedDict[str, list[int]]
    node_rank: int
    master_addr: str
    master_port: int
    script: str
    script_args: list[str] = field(default_factory=list)
    run_id: str = "ds-launch"
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    bind_cores_to_rank: bool = False
    bind_core_list: str | None = None
    term_timeout: float = 10.0
    monitor_interval: float = 0.05
    rdzv_timeout: int = 600
    exports: dict[str, str] = field(default_factory=dict)
    chdir: str | None = None
    watch_stdin: bool = False
    emit_marker: bool = False
    log_dir: str | None = None
    tail_lines: int = 20

    @property
    def host(self) -> str:
        """This node's name in the hostfile."""
        return list(self.world)[self.node_rank]


def _escape_macro(arg: str) -> str:
    # torch's elastic agent runs every worker argument through string.Template to expand
    # ${local_rank}, which would also turn "$$" into "$" and "${x}" into nothing useful.
    # Doubling every "$" makes user arguments come out exactly as given.
    return arg.replace("$", "$$")


def worker_command(cfg: AgentConfig) -> tuple[str, list[str]]:
    """(entrypoint, args) for each worker; ``${local_rank}`` is expanded per worker."""
    if cfg.no_python:
        cmd = [cfg.script]
    elif cfg.module:
        cmd = [sys.executable, "-u", "-m", cfg.script]
    else:
        cmd = [sys.executable, "-u", cfg.script]
    args = [_escape_macro(a) for a in cmd[1:]]
    if not cfg.no_local_rank:
        args.append("--local_rank=${local_rank}")  # DeepSpeed passes it before the user's arguments
    args += [_escape_macro(a) for a in cfg.script_args]
    entry = cmd[0]
    if cfg.bind_cores_to_rank:
        nproc = len(cfg.world[cfg.host])
        bind = ["-m", "ds_launch._bind", "${local_rank}", str(nproc), _escape_macro(cfg.bind_core_list or "")]
        args = [*bind, "--", _escape_macro(entry), *args]
        entry = sys.executable
    return entry, args


class _OutputPump(threading.Thread):
    """Copy workers' redirected output files to our stdout/stderr; keep each rank's last lines."""

    def __init__(self, files: list[tuple[int, str, BinaryIO]], keep: int, interval: float = 0.02) -> None:
        super().__init__(name="ds-launch-output", daemon=True)
        self._files = files
        self._interval = interval
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._handles: dict[str, BinaryIO] = {}
        self._partial: dict[tuple[int, str], bytes] = {}
        self.last_lines: dict[int, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=keep)
        )

    def _pass(self) -> bool:
        moved = False
        for local_rank, path, out in self._files:
            fh = self._handles.get(path)
            if fh is None:
                try:
                    fh = self._handles[path] = open(path, "rb")  # noqa: SIM115 - kept open across passes
                except FileNotFoundError:
                    continue
            chunk = fh.read(1 << 16)
            if not chunk:
                continue
            moved = True
            try:
                out.write(chunk)
                out.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # our reader went away; still keep the lines for the report
            data = self._partial.pop((local_rank, path), b"") + chunk
            *lines, rest = data.split(b"\n")
            for line in lines:
                self.last_lines[local_rank].append(line.decode(errors="replace"))
            if rest:
                self._partial[(local_rank, path)] = rest[-4096:]
        return moved

    def drain(self) -> None:
        """Copy everything written so far (a worker that has exited has written all it will)."""
        with self._lock:
            while self._pass():
                pass
            for (local_rank, path), rest in list(self._partial.items()):
                # An unterminated last line (a crash mid-print) still belongs in the report.
                self.last_lines[local_rank].append(rest.decode(errors="replace"))
                del self._partial[(local_rank, path)]

    def run(self) -> None:
        while not self._halt.is_set():
            with self._lock:
                moved = self._pass()
            if not moved:
                self._halt.wait(self._interval)

    def stop(self) -> None:
        """End the thread after a final drain; close the files."""
        self._halt.set()
        self.join(timeout=5)
        self.drain()
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def _make_agent_class() -> type:
    # Imported lazily: `ds-launch --help` and the multi-node controller never need torch.
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SignalException

    class DsLaunchAgent(LocalElasticAgent):
        """LocalElasticAgent + output pump, bounded shutdown and cross-node abort."""

        def __init__(self, *args: Any, cfg: AgentConfig, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.cfg = cfg
            self.pump: _OutputPump | None = None
            self.aborted = False
            self.status: int | None = None  # set when one of our workers failed
            self.exit_times: dict[int, float] = {}  # local rank -> when it exited (SIGCHLD)
            self._store_failures = 0

        def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
            main = threading.current_thread() is threading.main_thread()
            try:
                pids = super()._start_workers(worker_group)
            finally:
                if main:
                    _STOP.install()  # PContext.start() put torch's handlers back: [Note: one-shot stop]
            pc = self._pcontext
            _WORKER_GROUPS[:] = [h.proc.pid for h in getattr(pc, "subprocess_handlers", {}).values()]
            if main:
                signal.signal(signal.SIGCHLD, self._on_sigchld)
            files = [(r, pc.stdouts[r], sys.stdout.buffer) for r in sorted(pc.stdouts) if pc.stdouts[r]]
            files += [(r, pc.stderrs[r], sys.stderr.buffer) for r in sorted(pc.stderrs) if pc.stderrs[r]]
            self.pump = _OutputPump(files, keep=self.cfg.tail_lines)
            self.pump.start()
            return pids

        def _stop_workers(self, worker_group: WorkerGroup) -> None:
            self._shutdown(timeout=max(1, round(self.cfg.term_timeout)))
            self.kill_leftovers()

        def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
            # Every way out of torch's run() ends here (a signal, a failure, the end of the job):
            # from now on a further signal must not cut the workers' grace period short.
            _STOP.begin()
            super()._shutdown(death_sig, timeout)

        def _on_sigchld(self, _signum: int, _frame: object) -> None:
            # When one rank dies its peers often fail a moment later (connection reset). To
            # name the root cause we note when each worker exited, without reaping it (WNOWAIT).
            handlers = getattr(self._pcontext, "subprocess_handlers", {}) if self._pcontext else {}
            for local_rank, handler in handlers.items():
                if local_rank in self.exit_times:
                    continue
                with contextlib.suppress(ChildProcessError, OSError):
                    if os.waitid(os.P_PID, handler.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                        self.exit_times[local_rank] = time.monotonic()

        def kill_leftovers(self) -> None:
            """SIGKILL each worker's whole process group, even if the worker itself has exited:
            a worker's children (data loaders, compilers) must not outlive the job."""
            pc = self._pcontext
            kill_process_groups([h.proc.pid for h in getattr(pc, "subprocess_handlers", {}).values()] if pc else [])

        def _abort_requested(self, worker_group: WorkerGroup) -> bool:
            # [Note: cross-node abort] The store is the TCPStore of node 0's agent that the
            # workers also rendezvous through. A key there means another node failed; the
            # store being unreachable means node 0's agent is gone, so the job is over.
            try:
                return bool(worker_group.store.check([_ABORT_KEY]))
            except SignalException:
                raise  # a stop signal that arrived during the poll, not a store error
            except Exception:  # noqa: BLE001 - any store error means node 0 is gone
                self._store_failures += 1
                return self._store_failures >= 3

        def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
            _STOP.raise_pending()  # a stop signal whose exception was swallowed: stop now
            pc = self._pcontext
            if self.status is None and pc is not None:
                # Find the root cause ourselves, before torch's poll terminates the others
                # (with a fixed 30 s grace) and lists them as failures too.
                failed = [
                    (self.exit_times.get(lr, float("inf")), lr, h.proc.returncode)
                    for lr, h in getattr(pc, "subprocess_handlers", {}).items()
                    if h.proc.poll() not in (None, 0)
                ]
                if failed:
                    _, local_rank, code = min(failed)
                    _STOP.begin()
                    self.status = self._report(worker_group.workers[local_rank].global_rank, local_rank, code)
                    if len(self.cfg.world) > 1:
                        # Best effort: if the store is gone, the others notice that too.
                        with contextlib.suppress(Exception):
                            worker_group.store.set(_ABORT_KEY, self.cfg.host)
                    pc.close(signal.SIGTERM, timeout=max(1, round(self.cfg.term_timeout)))
            result = super()._monitor_workers(worker_group)
            if result.state == WorkerState.HEALTHY and len(self.cfg.world) > 1 and self._abort_requested(worker_group):
                _STOP.begin()
                self.aborted = True
                return RunResult(state=WorkerState.FAILED)
            return result

        def _report(self, rank: int, local_rank: int, exitcode: int) -> int:
            lines: list[str] = []
            if self.pump is not None:
                self.pump.drain()
                lines = list(self.pump.last_lines.get(local_rank, []))
            _report(self.cfg, rank, local_rank, exitcode, lines)
            return _exit_code(exitcode)

        def _exit_barrier(self) -> None:
            # Wait for the other nodes' workers (node 0 hosts the store they may still use),
            # but stop waiting as soon as any node reports a failure.
            if len(self.cfg.world) == 1:
                return
            store = self._worker_group.store
            keys = [f"{_DONE_KEY}{r}" for r in range(len(self.cfg.world))]
            try:
                store.set(keys[self.cfg.node_rank], "1")
                deadline = time.monotonic() + self._exit_barrier_timeout
                while time.monotonic() < deadline:
                    _STOP.raise_pending()
                    if store.check(keys) or store.check([_ABORT_KEY]):
                        return
                    time.sleep(self.cfg.monitor_interval)
            except SignalException:
                raise
            except Exception:  # noqa: BLE001 - the store's owner has exited: nothing left to wait for
                return

    return DsLaunchAgent


def _exit_code(code: int) -> int:
    """Negative exit codes mean "killed by signal": report them the shell's way, 128 + signal."""
    return 128 - code if code < 0 else code


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _report(cfg: AgentConfig, rank: int, local_rank: int, exitcode: int, lines: list[str]) -> None:
    how = f"was killed by {_signal_name(exitcode)}" if exitcode < 0 else f"exited with code {exitcode}"
    msg = [f"ds-launch: rank {rank} (local rank {local_rank}) on host {cfg.host} {how}"]
    if lines:
        msg.append(f"ds-launch: last {len(lines)} line(s) of rank {rank}'s output:")
        msg += [f"    | {line}" for line in lines]
    else:
        msg.append(f"ds-launch: rank {rank} printed nothing")
    if cfg.emit_marker:
        info = {"rank": rank, "local_rank": local_rank, "host": cfg.host, "exitcode": exitcode, "lines": lines}
        msg.append(FAILURE_MARKER + json.dumps(info))
    _write_stderr("\n".join(msg) + "\n")


def _prepare_environment(cfg: AgentConfig) -> None:
    os.environ.update(cfg.exports)
    if cfg.chdir:
        try:
            os.chdir(cfg.chdir)
        except OSError as e:
            raise SystemExit(
                f"ds-launch: cannot enter the launch directory {cfg.chdir!r} on host {cfg.host}: {e.strerror}; "
                "every node needs the same paths (shared filesystem or identical checkout)"
            ) from e
    slots = cfg.world[cfg.host]
    # DeepSpeed's launcher also sets these; scripts written for it read LOCAL_SIZE.
    os.environ["LOCAL_SIZE"] = str(len(slots))
    os.environ["CROSS_RANK"] = str(cfg.node_rank)
    os.environ["CROSS_SIZE"] = str(len(cfg.world))
    if len(slots) > 1 and "OMP_NUM_THREADS" not in os.environ and not cfg.bind_cores_to_rank:
        os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun: N ranks x all cores each would oversubscribe
    import torch

    if torch.cuda.is_available():
        # The selected slots are device ids, relative to any CUDA_VISIBLE_DEVICES already set.
        parent = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = parent.split(",") if parent else [str(i) for i in range(torch.cuda.device_count())]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[s] for s in slots if s < len(visible))


def run_node(cfg: AgentConfig) -> int:
    """Run this node's workers to completion; returns the exit status for the launcher.

    torch's elastic agent redirects each worker's output to files, which we stream to the
    console. Without ``--enable_each_rank_log`` those files go to a ``ds-launch-*`` folder in
    the temporary directory, removed when the node's run ends (a SIGKILLed launcher cannot
    remove it: such a folder is safe to delete).
    """
    own_dir = not cfg.log_dir
    log_dir = cfg.log_dir or tempfile.mkdtemp(prefix="ds-launch-")
    try:
        return _run_agent(cfg, log_dir)
    finally:
        if own_dir:
            shutil.rmtree(log_dir, ignore_errors=True)


def _run_agent(cfg: AgentConfig, log_dir: str) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", DEFAULT_SIGNALS)
    _STOP.install()
    try:
        agent, spec = _build_agent(cfg, log_dir)
    except SignalException as e:  # e.g. the launcher found another host unreachable
        _write_stderr(f"ds-launch: {e.sigval.name} received on host {cfg.host} before the workers started\n")
        return 128 + int(e.sigval)
    result = None
    stopped_by: signal.Signals | None = None
    try:
        result = agent.run()
    except SignalException as e:
        stopped_by = e.sigval
    finally:
        # Whatever ended the run (even an exception of our own), no worker process group may
        # outlive it. Stop signals are ignored from here on (our _shutdown began the stop).
        _STOP.begin()
        agent.kill_leftovers()
        if agent.pump:
            agent.pump.stop()
        with contextlib.suppress(Exception):  # the store may already be gone
            spec.rdzv_handler.shutdown()
    if agent.status is not None:
        return agent.status  # our worker's failure came first; a signal is its consequence
    if stopped_by is not None:
        _write_stderr(f"ds-launch: {stopped_by.name} received on host {cfg.host}; workers stopped\n")
        return 128 + int(stopped_by)
    if result is None or agent.aborted:
        _write_stderr(f"ds-launch: another node failed; stopped the workers on host {cfg.host}\n")
        return ABORTED_EXIT_CODE
    if result.is_failed():
        _write_stderr(f"ds-launch: workers on host {cfg.host} ended in state {result.state.name}\n")
        return 1
    return 0


def _build_agent(cfg: AgentConfig, log_dir: str) -> tuple[Any, Any]:
    """This node's environment, its rendezvous and its (not yet started) elastic agent."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    # torch logs the *earliest-timestamped* failure with 1 s resolution, which after we stop
    # the others is often a rank we killed; our own report names the root cause instead.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not str(record.msg).startswith("failed (exitcode")
    )
    if cfg.watch_stdin:
        watch_stdin(_STOP, _WORKER_GROUPS, cfg.term_timeout)
    _prepare_environment(cfg)
    from torch.distributed.elastic.agent.server.api import WorkerSpec

    nnodes = len(cfg.world)
    params = RendezvousParameters(
        backend="static",
        endpoint=f"{cfg.master_addr}:{cfg.master_port}",
        run_id=cfg.run_id,
        min_nodes=nnodes,
        max_nodes=nnodes,
        rank=cfg.node_rank,
        timeout=cfg.rdzv_timeout,
    )
    entry, args = worker_command(cfg)
    spec = WorkerSpec(
        role="worker",
        local_world_size=len(cfg.world[cfg.host]),
        entrypoint=entry,
        args=tuple(args),
        rdzv_handler=rdzv_registry.get_rendezvous_handler(params),
        max_restarts=0,
        monitor_interval=cfg.monitor_interval,
        master_addr=cfg.master_addr,
        master_port=cfg.master_port,
    )
    agent_cls = _make_agent_class()
    agent = agent_cls(
        spec=spec,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ALL, tee=Std.NONE),
        start_method="spawn",
        shutdown_timeout=max(1, round(cfg.term_timeout)),
        exit_barrier_timeout=300,
        cfg=cfg,
    )
    return agent, spec


def resolve_node_rank(value: str, world: OrderedDict[str, list[int]]) -> int:
    """``--node_rank``: an integer, or ``env`` for runners that start one agent per node
    (mpirun, srun): this host's position in the hostfile if its name is there, else the
    rank the MPI/SLURM launcher gave this process."""
    if value != "env":
        rank = int(value)
        if not 0 <= rank < len(world):
            raise SystemExit(f"ds-launch agent: --node_rank {rank} out of range for {len(world)} node(s)")
        return rank
    hosts = list(world)
    names = {socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0]}
    for name in names:
        if name in hosts:
            return hosts.index(name)
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    raise SystemExit(
        "ds-launch agent: --node_rank env but no MPI/SLURM rank variable is set and the host name is unknown"
    )


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m ds_launch.agent`` (written by the runners, not by users)."""
    p = argparse.ArgumentParser(prog="python -m ds_launch.agent", description="ds-launch per-node agent")
    p.add_argument("--world_info", required=True)
    p.add_argument("--node_rank", default="env")
    p.add_argument("--master_addr", required=True)
    p.add_argument("--master_port", type=int, required=True)
    p.add_argument("--run_id", default="ds-launch")
    p.add_argument("--module", action="store_true")
    p.add_argument("--no_python", action="store_true")
    p.add_argument("--no_local_rank", action="store_true")
    p.add_argument("--bind_cores_to_rank", action="store_true")
    p.add_argument("--bind_core_list", default=None)
    p.add_argument("--term_timeout", type=float, default=10.0)
    p.add_argument("--monitor_interval", type=float, default=0.05)
    p.add_argument("--export", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--chdir", default=None)
    p.add_argument("--watch_stdin", action="store_true")
    p.add_argument("--log_dir", default=None)
    p.add_argument("user_script")
    p.add_argument("user_args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ds_launch.agent``."""
    ns = build_parser().parse_args(argv)
    world = decode_world_info(ns.world_info)
    exports = dict(item.split("=", 1) for item in ns.export)
    cfg = AgentConfig(
        world=world,
        node_rank=resolve_node_rank(ns.node_rank, world),
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        script=ns.user_script,
        script_args=list(ns.user_args),
        run_id=ns.run_id,
        module=ns.module,
        no_python=ns.no_python,
        no_local_rank=ns.no_local_rank,
        bind_cores_to_rank=ns.bind_cores_to_rank,
        bind_core_list=ns.bind_core_list,
        term_timeout=ns.term_timeout,
        monitor_interval=ns.monitor_interval,
        exports=exports,
        chdir=ns.chdir,
        watch_stdin=ns.watch_stdin,
        emit_marker=True,
        log_dir=ns.log_dir,
    )
    return run_node(cfg)


if __name__ == "__main__":
    sys.exit(main())
