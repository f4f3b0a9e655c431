"""The command line: argument checks with clear errors, --dry_run output per node."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from ds_launch.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("n1 slots=4\nn2 slots=4\nn3 slots=2\n")
    return path


def test_dry_run_local(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "--num_gpus", "2", "--dry_run", "--hostfile", "/nonexistent/default", "t.py", "a b")
    assert code == 2  # an explicit --hostfile that does not exist is an error, not a silent local run
    code, out, _ = run_cli(capsys, "--num_gpus", "2", "--dry_run", "--master_port", "1234", "t.py", "a b", "$X")
    assert code == 0
    assert "MASTER_ADDR=127.0.0.1 MASTER_PORT=1234" in out
    workers = [line for line in out.splitlines() if "worker:" in line]
    assert len(workers) == 2
    argv = shlex.split(workers[1].split("worker:", 1)[1])
    assert argv[:3] == ["RANK=1", "LOCAL_RANK=1", "WORLD_SIZE=2"]
    assert argv[3:] == [sys.executable, "-u", "t.py", "--local_rank=1", "a b", "$X"]


def test_dry_run_ssh_per_node(capsys: pytest.CaptureFixture[str], hostfile: Path) -> None:
    code, out, _ = run_cli(capsys, "-H", str(hostfile), "--exclude", "n2", "--dry_run", "--ssh_port", "2022", "t.py")
    assert code == 0
    assert "# node n1" in out and "# node n3" in out and "# node n2" not in out
    lines = [line for line in out.splitlines() if line.startswith("ssh ")]
    assert len(lines) == 2 and all("-p 2022" in line for line in lines)
    assert "--master_addr=n1" in out  # node 0 hosts the rendezvous


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi", "mpich", "mvapich", "slurm"])
def test_dry_run_other_runners(capsys: pytest.CaptureFixture[str], hostfile: Path, launcher: str) -> None:
    code, out, _ = run_cli(capsys, "-H", str(hostfile), "--num_nodes", "2", "--launcher", launcher, "--dry_run", "t.py")
    assert code == 0 and "ds_launch.agent" in out and "n3" not in out


def test_force_multi_single_host(capsys: pytest.CaptureFixture[str], hostfile: Path) -> None:
    code, out, _ = run_cli(capsys, "-H", str(hostfile), "--include", "n2:0,1", "--force_multi", "--dry_run", "t.py")
    assert code == 0 and "# node n2" in out and out.count("ssh ") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--launcher", "rsh"], "--launcher 'rsh': expected one of ssh, pdsh"),
        (["--no_ssh"], "--no_ssh needs --node_rank"),
        (["--node_rank", "1"], "--node_rank is only used with --no_ssh"),
        (["--include", "n9"], "host 'n9' is not in the hostfile"),
        (["--include", "n1", "--num_gpus", "1"], "cannot be combined"),
        (["--term_timeout", "0"], "--term_timeout 0.0: expected a positive"),
        (["--no_ssh", "--node_rank", "5"], "--node_rank 5: the hostfile has 3 node(s)"),
        (["--elastic_training"], "not supported"),
    ],
)
def test_bad_arguments(capsys: pytest.CaptureFixture[str], hostfile: Path, argv: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, "-H", str(hostfile), *argv, "--dry_run", "t.py")
    assert code == 2 and message in err


def test_bad_hostfile_names_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "hf"
    bad.write_text("n1 slots=4\nn2 slots=four\n")
    code, _, err = run_cli(capsys, "-H", str(bad), "--dry_run", "t.py")
    assert code == 2 and f"{bad}:2: host 'n2' has slots='four'" in err


def test_bad_env_file(capsys: pytest.CaptureFixture[str], hostfile: Path, tmp_path: Path, monkeypatch) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("GOOD=1\nthis is not an assignment\n")
    monkeypatch.setenv("DS_ENV_FILE", str(env_file))
    code, _, err = run_cli(capsys, "-H", str(hostfile), "--dry_run", "t.py")
    assert code == 2 and f"{env_file}:2: bad line" in err


def _workers(out: str) -> list[list[str]]:
    return [shlex.split(line.split("worker:", 1)[1]) for line in out.splitlines() if "worker:" in line]


def test_dry_run_module_and_bind(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "--num_gpus", "2", "--module", "--bind_cores_to_rank", "--no_local_rank", "--dry_run", "pkg.train", "$1"
    )
    assert code == 0
    shim = [sys.executable, "-m", "ds_launch._bind", "1", "2", "", "--"]
    assert _workers(out)[1][3:] == [*shim, sys.executable, "-u", "-m", "pkg.train", "$1"]


def test_dry_run_no_python(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--num_gpus", "1", "--no_python", "--dry_run", "./run.sh", "x")
    assert code == 0 and _workers(out)[0][3:] == ["./run.sh", "--local_rank=0", "x"]


def test_help_shows_only_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    flat = " ".join(out.split())  # argparse wraps lines
    for empty in ("(default: )", "(default: None)", "(default: False)"):
        assert empty not in flat
    assert "address of node 0 (default: first host, or 127.0.0.1) --launcher" in flat
    assert "(default: /job/hostfile)" in flat and "(default: ssh)" in flat


def test_master_port_default(capsys: pytest.CaptureFixture[str], hostfile: Path) -> None:
    """One node: a free port per run; several nodes (or --no_ssh): DeepSpeed's 29500, which all nodes know."""
    ports = set()
    for _ in range(2):
        code, out, _ = run_cli(capsys, "--num_gpus", "2", "--dry_run", "t.py")
        assert code == 0
        ports.add(int(out.split("MASTER_PORT=")[1].split()[0]))
    assert 29500 not in ports and all(0 < p < 65536 for p in ports)
    code, out, _ = run_cli(capsys, "-H", str(hostfile), "--dry_run", "t.py")
    assert code == 0 and "--master_port=29500" in out
    code, out, _ = run_cli(capsys, "-H", str(hostfile), "--no_ssh", "--node_rank", "1", "--dry_run", "t.py")
    assert code == 0 and "MASTER_PORT=29500" in out
    code, _, err = run_cli(capsys, "--master_port", "70000", "--dry_run", "t.py")
    assert code == 2 and "--master_port 70000" in err
