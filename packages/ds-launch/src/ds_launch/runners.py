"""Command construction for each multi-node runner: ssh, pdsh, OpenMPI, MPICH/MVAPICH, SLURM.

Every runner starts one :mod:`ds_launch.agent` per node; the agent starts that node's
workers through torch's elastic agent, so every runner gives the workers the same
environment (RANK, LOCAL_RANK, WORLD_SIZE, ..., LOCAL_SIZE) and the same failure handling.

Quoting: MPI launchers and srun take an argv and exec it, so arguments reach the agent
as they are. ssh and pdsh hand one string to the remote login shell; that string is built
with :func:`shlex.quote` for every word, so an argument with spaces, quotes or ``$``
arrives unchanged (tested). Nothing runs through a local shell.
"""

from __future__ import annotations

import shlex
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

from .agent import encode_world_info

__all__ = ["RUNNERS", "JobSpec", "NodeCommand", "agent_argv", "build_commands"]

RUNNERS = ("ssh", "pdsh", "openmpi", "mpich", "mvapich", "slurm")


@dataclass
class JobSpec:
    """Everything the runners need to write their commands."""

    world: OrderedDict[str, list[int]]
    master_addr: str
    master_port: int
    user_script: str
    user_args: list[str]
    run_id: str
    cwd: str
    exports: dict[str, str] = field(default_factory=dict)
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    bind_cores_to_rank: bool = False
    bind_core_list: str | None = None
    term_timeout: float = 10.0
    launcher_args: list[str] = field(default_factory=list)
    ssh_port: int | None = None
    ssh_identity: str | None = None
    ssh_options: list[str] = field(default_factory=list)
    python: str = sys.executable


@dataclass
class NodeCommand:
    """One process the launcher starts locally: argv plus extra environment.

    ``host`` is the node it drives (``None`` for a runner that drives all nodes at once).
    """

    argv: list[str]
    host: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def display(self) -> str:
        """The command as a copy-pasteable shell line (for --dry_run)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


def agent_argv(job: JobSpec, node_rank: str, *, watch_stdin: bool = False) -> list[str]:
    """``python -u -m ds_launch.agent ... -- script args`` for one node (or ``env`` rank)."""
    argv = [
        job.python,
        "-u",
        "-m",
        "ds_launch.agent",
        f"--world_info={encode_world_info(job.world)}",
        f"--node_rank={node_rank}",
        f"--master_addr={job.master_addr}",
        f"--master_port={job.master_port}",
        f"--run_id={job.run_id}",
        f"--term_timeout={job.term_timeout:g}",
        f"--chdir={job.cwd}",
    ]
    argv += [f"--export={k}={v}" for k, v in job.exports.items()]
    for flag in ("module", "no_python", "no_local_rank", "bind_cores_to_rank"):
        if getattr(job, flag):
            argv.append(f"--{flag}")
    if job.bind_core_list:
        argv.append(f"--bind_core_list={job.bind_core_list}")
    if watch_stdin:
        argv.append("--watch_stdin")
    return [*argv, "--", job.user_script, *job.user_args]


def ssh_options(job: JobSpec) -> list[str]:
    """Non-interactive ssh: never prompt, fail fast, detect a dead peer."""
    opts = [
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    if job.ssh_port:
        opts += ["-p", str(job.ssh_port)]
    if job.ssh_identity:
        opts += ["-i", job.ssh_identity]
    return [*opts, *job.ssh_options]


def _ssh(job: JobSpec) -> list[NodeCommand]:
    commands = []
    for rank, host in enumerate(job.world):
        # ssh joins its arguments with spaces for the remote shell: give it one string in
        # which every word is quoted. stdin stays a pipe from us so the agent sees EOF when we go.
        remote = shlex.join(agent_argv(job, str(rank), watch_stdin=True))
        commands.append(NodeCommand(["ssh", *ssh_options(job), *job.launcher_args, host, remote], host=host))
    return commands


def _pdsh(job: JobSpec) -> list[NodeCommand]:
    # pdsh replaces %n by each host's position (the node rank) and %% by %.
    words = [shlex.quote(w).replace("%", "%%") for w in agent_argv(job, "NODE_RANK")]
    remote = " ".join(words).replace("--node_rank=NODE_RANK", "--node_rank=%n")
    env = {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": shlex.join(ssh_options(job))}
    argv = ["pdsh", "-S", "-f", "1024", "-w", ",".join(job.world), *job.launcher_args, remote]
    return [NodeCommand(argv, env=env)]


def _openmpi(job: JobSpec) -> list[NodeCommand]:
    n = len(job.world)
    hosts = ",".join(f"{h}:1" for h in job.world)
    argv = ["mpirun", "-n", str(n), "--host", hosts, "--map-by", "ppr:1:node", "--bind-to", "none"]
    argv += ["--mca", "btl", "^openib", "-x", "PATH", *job.launcher_args]
    return [NodeCommand([*argv, *agent_argv(job, "env")])]


def _mpich(job: JobSpec) -> list[NodeCommand]:
    # Hydra (MPICH, MVAPICH2, Intel MPI's mpiexec): one process per node, in host order.
    n = len(job.world)
    argv = ["mpirun", "-n", str(n), "-ppn", "1", "-hosts", ",".join(job.world), *job.launcher_args]
    return [NodeCommand([*argv, *agent_argv(job, "env")])]


def _slurm(job: JobSpec) -> list[NodeCommand]:
    # One task per node; --kill-on-bad-exit makes SLURM stop the step if an agent fails.
    n = len(job.world)
    argv = ["srun", "--nodes", str(n), "--ntasks", str(n), "--ntasks-per-node", "1"]
    argv += ["--nodelist", ",".join(job.world), "--kill-on-bad-exit=1", *job.launcher_args]
    return [NodeCommand([*argv, *agent_argv(job, "env")])]


_BUILDERS = {"ssh": _ssh, "pdsh": _pdsh, "openmpi": _openmpi, "mpich": _mpich, "mvapich": _mpich, "slurm": _slurm}


def build_commands(runner: str, job: JobSpec) -> list[NodeCommand]:
    """The local processes that start the job on every node with ``runner``."""
    if runner not in _BUILDERS:
        raise ValueError(f"--launcher {runner!r}: expected one of {', '.join(RUNNERS)}")
    return _BUILDERS[runner](job)
