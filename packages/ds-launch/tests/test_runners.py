"""Command construction per runner, with arguments that break naive quoting."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from ds_launch.agent import build_parser, decode_world_info, encode_world_info
from ds_launch.runners import JobSpec, agent_argv, build_commands

TRICKY = [
    "a b",
    "it's",
    'say "hi"',
    "$HOME",
    "${local_rank}",
    "$$",
    "`id`",
    "$(echo pwned)",
    "x;y",
    "*",
    "%n",
    "100%",
    "-v",
    "",
    "\\n",
    "é",
]
WORLD = OrderedDict([("node-a", [0, 1]), ("node-b", [0, 1, 2])])


def job(**kw) -> JobSpec:
    base = dict(
        world=WORLD,
        master_addr="node-a",
        master_port=29511,
        user_script="train.py",
        user_args=list(TRICKY),
        run_id="r1",
        cwd="/work dir/$x",
        exports={"NCCL_IB_DISABLE": "1", "WEIRD": "a b=c $d 'e'"},
    )
    base.update(kw)
    return JobSpec(**base)


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """An executable that prints its argv as JSON: stands in for the remote python."""
    path = tmp_path / "fake python"
    path.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    path.chmod(0o755)
    return str(path)


def test_world_info_round_trip() -> None:
    assert decode_world_info(encode_world_info(WORLD)) == WORLD
    # DeepSpeed's own encoding (a JSON object) is accepted too.
    import base64

    ds = base64.urlsafe_b64encode(json.dumps({"h1": [0, 1]}).encode()).decode()
    assert decode_world_info(ds) == OrderedDict(h1=[0, 1])


def test_agent_argv_parses_back_unchanged() -> None:
    argv = agent_argv(job(), "1")
    ns = build_parser().parse_args(argv[4:])
    assert ns.user_script == "train.py" and ns.user_args == TRICKY
    assert ns.chdir == "/work dir/$x" and ns.node_rank == "1" and ns.master_port == 29511
    assert dict(e.split("=", 1) for e in ns.export)["WEIRD"] == "a b=c $d 'e'"


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_ssh_remote_string_survives_the_remote_shell(shell: str, fake_python: str) -> None:
    cmds = build_commands("ssh", job(python=fake_python, ssh_port=2222, ssh_identity="/k/id"))
    assert [c.host for c in cmds] == ["node-a", "node-b"]
    for rank, cmd in enumerate(cmds):
        argv = cmd.argv
        assert argv[0] == "ssh" and "BatchMode=yes" in argv and "StrictHostKeyChecking=no" in argv
        assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == "/k/id"
        assert argv[-2] == cmd.host
        # ssh hands argv[-1] to the remote login shell: run it through a real shell here.
        out = subprocess.run([shell, "-c", argv[-1]], capture_output=True, text=True, check=True).stdout
        got = json.loads(out)
        assert got == agent_argv(job(python=fake_python), str(rank), watch_stdin=True)[1:]
        assert got[-len(TRICKY) :] == TRICKY


def test_pdsh_command(fake_python: str) -> None:
    (cmd,) = build_commands("pdsh", job(python=fake_python, ssh_port=2200))
    assert cmd.argv[:6] == ["pdsh", "-S", "-f", "1024", "-w", "node-a,node-b"]
    assert cmd.env["PDSH_RCMD_TYPE"] == "ssh" and "-p 2200" in cmd.env["PDSH_SSH_ARGS_APPEND"]
    remote = cmd.argv[-1]
    assert "--node_rank=%n" in remote
    # What pdsh does to the string (%n -> rank, %% -> %), then the remote shell.
    substituted = re.sub(r"%(.)", lambda m: {"n": "1", "%": "%"}.get(m[1], m[0]), remote)
    got = json.loads(subprocess.run(["sh", "-c", substituted], capture_output=True, text=True, check=True).stdout)
    assert got == agent_argv(job(python=fake_python), "1")[1:]


def test_openmpi_command() -> None:
    (cmd,) = build_commands("openmpi", job(launcher_args=["--mca", "x", "y"]))
    argv = cmd.argv
    assert argv[:5] == ["mpirun", "-n", "2", "--host", "node-a:1,node-b:1"]
    assert argv[5:7] == ["--map-by", "ppr:1:node"]
    assert argv[argv.index("x") - 1 : argv.index("x") + 2] == ["--mca", "x", "y"]  # --launcher_args
    i = argv.index(sys.executable)
    assert argv[i:] == agent_argv(job(), "env") and argv[-len(TRICKY) :] == TRICKY


@pytest.mark.parametrize("runner", ["mpich", "mvapich"])
def test_mpich_command(runner: str) -> None:
    (cmd,) = build_commands(runner, job())
    assert cmd.argv[:7] == ["mpirun", "-n", "2", "-ppn", "1", "-hosts", "node-a,node-b"]
    assert cmd.argv[7:] == agent_argv(job(), "env")


def test_slurm_command() -> None:
    (cmd,) = build_commands("slurm", job())
    argv = cmd.argv
    assert argv[:7] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1"]
    assert "--kill-on-bad-exit=1" in argv and argv[argv.index("--nodelist") + 1] == "node-a,node-b"
    assert argv[argv.index(sys.executable) :] == agent_argv(job(), "env")


def test_flags_reach_the_agent() -> None:
    argv = agent_argv(job(module=True, no_local_rank=True, bind_cores_to_rank=True, bind_core_list="0-3"), "0")
    ns = build_parser().parse_args(argv[4:])
    assert ns.module and ns.no_local_rank and ns.bind_cores_to_rank and ns.bind_core_list == "0-3"
    assert not ns.no_python and not ns.watch_stdin


def test_unknown_runner() -> None:
    with pytest.raises(ValueError, match="expected one of ssh, pdsh"):
        build_commands("rsh", job())


def test_display_is_a_shell_line() -> None:
    (cmd,) = build_commands("pdsh", job())
    assert shlex.split(cmd.display())[0].startswith("PDSH_RCMD_TYPE=")
    assert os.path.basename(shlex.split(cmd.display())[2]) == "pdsh"
