"""The ``ds-launch`` command: DeepSpeed's launcher arguments, our failure handling.

``ds-launch [--num_gpus N] [--num_nodes N] [--hostfile F] [--include/--exclude SPEC]
[--master_addr A] [--master_port P] [--launcher ssh|pdsh|openmpi|mpich|mvapich|slurm]
[--no_ssh --node_rank N] [--force_multi] [--module] [--no_python] [--no_local_rank]
[--bind_cores_to_rank] [--dry_run] script.py args...``
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import uuid
from collections import OrderedDict

from .agent import AgentConfig, run_node, worker_command
from .envfile import EnvFileError, collect_exports, env_file_paths, parse_env_file
from .hostfile import HostfileError, read_hostfile, select_resources
from .runners import RUNNERS, JobSpec, NodeCommand, build_commands

__all__ = ["build_parser", "main"]

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default (DLTS)
DEFAULT_MASTER_PORT = 29500


class LaunchError(Exception):
    """A bad argument combination; the message says which argument and what is accepted."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only when there is a default worth showing.

    (An empty or None default printed as "(default: )", a flag as "(default: False)", and a
    help text that already explains its default must not get a second one.)
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, "", "None", argparse.SUPPRESS) or isinstance(action.default, bool):
            return text  # nothing to show, or an on/off flag
        if "default" in text:
            return text
        return super()._get_help_string(action)


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port on ``addr`` that the kernel reports free (as torchrun's standalone mode picks one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    """DeepSpeed's launcher arguments (same names and defaults) plus ours."""
    p = argparse.ArgumentParser(
        prog="ds-launch",
        description="Launch a training script on one node or many (DeepSpeed's launcher arguments).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("-H", "--hostfile", default=DEFAULT_HOSTFILE, help="'hostname slots=N' lines; missing = local run")
    p.add_argument("-i", "--include", default="", help="NAME[:SLOT[,SLOT...]][@NAME...]: only these hosts/slots")
    p.add_argument("-e", "--exclude", default="", help="same grammar as --include: drop these hosts/slots")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts of the hostfile")
    p.add_argument(
        "--num_gpus",
        "--num_accelerators",
        type=int,
        default=-1,
        help="workers per node (slots 0..N-1); on CPU-only hosts the number of worker processes",
    )
    p.add_argument(
        "--master_port",
        type=int,
        default=None,
        help=f"rendezvous port on node 0 (default: {DEFAULT_MASTER_PORT} with several nodes or --no_ssh; "
        "a free port on a single node, so two jobs on one machine do not collide)",
    )
    p.add_argument("--master_addr", default="", help="address of node 0 (default: first host, or 127.0.0.1)")
    p.add_argument("--launcher", default="ssh", help=f"multi-node runner: {', '.join(RUNNERS)}")
    p.add_argument("--launcher_args", default="", help="extra arguments for the runner, as one quoted string")
    p.add_argument("--module", action="store_true", help="run the script as a module (python -m)")
    p.add_argument("--no_python", action="store_true", help="execute the script directly, not with python")
    p.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank=N to the script")
    p.add_argument(
        "--no_ssh", action="store_true", help="run this node only (one launcher per node, e.g. by a scheduler)"
    )
    p.add_argument("--node_rank", type=int, default=-1, help="this node's rank with --no_ssh")
    p.add_argument("--no_ssh_check", action="store_true", help="accepted for compatibility (no ssh probe is made)")
    p.add_argument("--force_multi", action="store_true", help="use the multi-node runner even for one host")
    p.add_argument("--save_pid", action="store_true", help="write our pid to /tmp/<pid>.ds")
    p.add_argument("--enable_each_rank_log", default="None", help="directory for each rank's stdout/stderr files")
    p.add_argument("--bind_cores_to_rank", action="store_true", help="bind each rank to its share of the cores")
    p.add_argument("--bind_core_list", default=None, help="cores to share out, e.g. 0-7,16-23")
    p.add_argument("--ssh_port", type=int, default=None, help="ssh port of every host")
    p.add_argument("--ssh_identity", default=os.environ.get("DS_LAUNCH_SSH_IDENTITY"), help="ssh private key file")
    p.add_argument(
        "--term_timeout",
        type=float,
        default=float(os.environ.get("DS_LAUNCH_TERM_TIMEOUT", 10)),
        help="seconds between SIGTERM and SIGKILL when stopping workers after a failure",
    )
    p.add_argument("--dry_run", action="store_true", help="print the commands per node and exit")
    p.add_argument("--elastic_training", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--autotuning", default="", help=argparse.SUPPRESS)
    p.add_argument("user_script", help="training script (or module with --module), then its arguments")
    p.add_argument("user_args", nargs=argparse.REMAINDER)
    return p


def _local_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _resources(args: argparse.Namespace) -> OrderedDict[str, list[int]]:
    """The active ``{host: slots}``: from the hostfile, or this machine when there is none."""
    explicit = args.hostfile != DEFAULT_HOSTFILE
    pool = read_hostfile(args.hostfile)
    if pool is None and explicit:
        raise LaunchError(f"--hostfile {args.hostfile}: no such file")
    if pool is None:
        if args.num_nodes > 1:
            raise LaunchError(f"--num_nodes {args.num_nodes} needs a --hostfile listing the nodes")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        count = args.num_gpus if args.num_gpus > 0 else _local_device_count()
        pool = OrderedDict(localhost=count)
        if visible and not (args.include or args.exclude or args.num_gpus > 0):
            # DeepSpeed: a local run respects CUDA_VISIBLE_DEVICES when no filter is given;
            # the agent maps slots through it, so use all of them.
            pool = OrderedDict(localhost=len(visible.split(",")))
        return select_resources(pool, args.include, args.exclude, -1, -1)
    return select_resources(pool, args.include, args.exclude, args.num_nodes, args.num_gpus)


def _check(args: argparse.Namespace) -> None:
    if args.elastic_training or args.autotuning:
        raise LaunchError("--elastic_training/--autotuning are not supported by ds-launch")
    if args.launcher.lower() not in RUNNERS:
        raise LaunchError(f"--launcher {args.launcher!r}: expected one of {', '.join(RUNNERS)}")
    if args.no_ssh and args.node_rank < 0:
        raise LaunchError("--no_ssh needs --node_rank N (this node's position in the hostfile)")
    if args.node_rank >= 0 and not args.no_ssh:
        raise LaunchError("--node_rank is only used with --no_ssh")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise LaunchError(f"--master_port {args.master_port}: expected a TCP port, 1-65535")
    if args.term_timeout <= 0:
        raise LaunchError(f"--term_timeout {args.term_timeout}: expected a positive number of seconds")
    if args.module and args.no_python:
        raise LaunchError("--module and --no_python are mutually exclusive")


def _agent_config(
    args: argparse.Namespace, world: OrderedDict[str, list[int]], node_rank: int, master: str
) -> AgentConfig:
    log_dir = None if args.enable_each_rank_log in ("", "None") else args.enable_each_rank_log
    return AgentConfig(
        world=world,
        node_rank=node_rank,
        master_addr=master,
        master_port=args.master_port,
        script=args.user_script,
        script_args=list(args.user_args),
        run_id=args.run_id,
        module=args.module,
        no_python=args.no_python,
        no_local_rank=args.no_local_rank,
        bind_cores_to_rank=args.bind_cores_to_rank,
        bind_core_list=args.bind_core_list,
        term_timeout=args.term_timeout,
        log_dir=log_dir,
    )


def _print_workers(cfg: AgentConfig, first_rank: int) -> None:
    entry, wargs = worker_command(cfg)
    n = sum(len(s) for s in cfg.world.values())
    for local_rank, _ in enumerate(cfg.world[cfg.host]):
        argv = [entry, *(a.replace("${local_rank}", str(local_rank)).replace("$$", "$") for a in wargs)]
        env = f"RANK={first_rank + local_rank} LOCAL_RANK={local_rank} WORLD_SIZE={n}"
        print(f"    worker: {env} {shlex.join(argv)}")


def _local_env_file_exports() -> dict[str, str]:
    exports: dict[str, str] = {}
    for path in env_file_paths():
        if path.is_file():
            exports.update(parse_env_file(path.read_text(), source=str(path)))
    return exports


def _run(args: argparse.Namespace) -> int:
    _check(args)
    args.launcher = args.launcher.lower()
    world = _resources(args)
    if args.no_ssh:
        if args.node_rank >= len(world):
            raise LaunchError(f"--node_rank {args.node_rank}: the hostfile has {len(world)} node(s)")
        master = args.master_addr or next(iter(world))
        cfg = _agent_config(args, world, args.node_rank, master)
        cfg.exports = _local_env_file_exports()
        return _run_local(args, cfg)
    multi = args.force_multi or len(world) > 1
    if not multi:
        master = args.master_addr or "127.0.0.1"
        if args.master_port is None:
            # One node: nothing else has to know the port, so take a free one (torchrun
            # --standalone does the same); a fixed 29500 made two jobs on one machine collide.
            args.master_port = free_port("" if args.master_addr else "127.0.0.1")
        cfg = _agent_config(args, world, 0, master)
        cfg.exports = _local_env_file_exports()
        return _run_local(args, cfg)
    if args.master_port is None:
        args.master_port = DEFAULT_MASTER_PORT  # several nodes meet on DeepSpeed's default port
    job = JobSpec(
        world=world,
        master_addr=args.master_addr or next(iter(world)),
        master_port=args.master_port,
        user_script=args.user_script,
        user_args=list(args.user_args),
        run_id=args.run_id,
        cwd=os.getcwd(),
        exports=collect_exports(),
        module=args.module,
        no_python=args.no_python,
        no_local_rank=args.no_local_rank,
        bind_cores_to_rank=args.bind_cores_to_rank,
        bind_core_list=args.bind_core_list,
        term_timeout=args.term_timeout,
        launcher_args=shlex.split(args.launcher_args),
        ssh_port=args.ssh_port,
        ssh_identity=args.ssh_identity,
        ssh_options=shlex.split(os.environ.get("DS_LAUNCH_SSH_ARGS", "")),
    )
    commands = build_commands(args.launcher, job)
    if args.dry_run:
        for cmd in commands:
            print(f"# {'node ' + cmd.host if cmd.host else args.launcher + ' (all nodes)'}")
            print(cmd.display())
        return 0
    from .controller import supervise

    cleanup = None
    if args.launcher == "pdsh":
        # pdsh cannot forward a signal to the remote commands: kill exactly this run's agents.
        # "[d]s_launch" matches the agents but not this pattern's own text in the pkill/pdsh argv.
        pattern = rf"[d]s_launch\.agent .*--run_id={args.run_id}( |$)"
        kill = ["pdsh", "-w", ",".join(world), f"pkill -TERM -f -- {shlex.quote(pattern)}"]
        cleanup = NodeCommand(kill, env=commands[0].env)
    return supervise(commands, args.term_timeout, prefix_hosts=args.launcher == "ssh", cleanup=cleanup)


def _run_local(args: argparse.Namespace, cfg: AgentConfig) -> int:
    if args.dry_run:
        first = sum(len(s) for s in list(cfg.world.values())[: cfg.node_rank])
        print(f"# node {cfg.host} (node rank {cfg.node_rank}, in this process via torch.distributed.elastic)")
        print(f"    rendezvous: MASTER_ADDR={cfg.master_addr} MASTER_PORT={cfg.master_port}")
        _print_workers(cfg, first)
        return 0
    return run_node(cfg)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ds-launch`` and ``python -m ds_launch``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.master_port is None and args.no_ssh:
        # One launcher per node (--no_ssh): every node must arrive at the same port unprompted.
        args.master_port = DEFAULT_MASTER_PORT
    # Every node's agent must use the same rendezvous id. With --no_ssh each node has its own
    # launcher, so the id is derived from what they share (the port) unless one is given.
    default_id = f"ds-launch-{args.master_port}" if args.no_ssh else uuid.uuid4().hex[:12]
    args.run_id = os.environ.get("DS_LAUNCH_RUN_ID") or default_id
    if args.save_pid:
        with open(f"/tmp/{os.getpid()}.ds", "w") as fh:
            fh.write(str(os.getpid()))
    try:
        return _run(args)
    except (LaunchError, HostfileError, EnvFileError, ValueError) as e:
        parser.exit(2, f"ds-launch: error: {e}\n")
    return 2


def console_main() -> None:
    """Console-script wrapper."""
    sys.exit(main())
