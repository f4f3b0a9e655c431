"""``.deepspeed_env`` parsing and what is exported to every node."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_launch.envfile import EnvFileError, collect_exports, env_file_paths, parse_env_file


def test_values_kept_verbatim() -> None:
    text = (
        "# comment\n\n"
        "NCCL_SOCKET_IFNAME=eth0\n"
        "WITH_SPACES=a b  c\n"
        "WITH_EQUALS=x=1,y=2\n"
        "SHELLISH=$HOME `id` $(rm -rf /) 'q' \"qq\"\n"
        "export EXPORTED=1\n"
        "  PADDED  =  v  \n"
        "EMPTY=\n"
    )
    assert parse_env_file(text) == {
        "NCCL_SOCKET_IFNAME": "eth0",
        "WITH_SPACES": "a b  c",
        "WITH_EQUALS": "x=1,y=2",
        "SHELLISH": "$HOME `id` $(rm -rf /) 'q' \"qq\"",
        "EXPORTED": "1",
        "PADDED": "v",
        "EMPTY": "",
    }


@pytest.mark.parametrize("line", ["NOEQUALS", "1BAD=x", "BAD NAME=x", "=value"])
def test_bad_lines(line: str) -> None:
    with pytest.raises(EnvFileError, match=r"envf:2: bad line"):
        parse_env_file(f"OK=1\n{line}\n", source="envf")


def test_paths_home_then_cwd_and_ds_env_file(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    assert env_file_paths({"HOME": str(home)}, cwd) == [home / ".deepspeed_env", cwd / ".deepspeed_env"]
    assert env_file_paths({"HOME": str(home), "DS_ENV_FILE": "my.env"}, cwd) == [home / "my.env", cwd / "my.env"]
    assert env_file_paths({"HOME": str(home), "DS_ENV_FILE": "/etc/x.env"}, cwd) == [Path("/etc/x.env")]


def test_collect_exports(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepspeed_env").write_text("B=cwd value\n")
    environ = {"HOME": str(home), "NCCL_DEBUG": "INFO", "SECRET": "no", "PYTHONPATH": "/x"}
    exports = collect_exports(environ, cwd)
    assert exports["A"] == "home" and exports["B"] == "cwd value"  # ./ overrides ~/
    assert exports["NCCL_DEBUG"] == "INFO" and "SECRET" not in exports
    assert exports["PYTHONPATH"] == f"{cwd}:/x"
