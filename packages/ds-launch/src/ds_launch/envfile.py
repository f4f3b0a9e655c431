"""``.deepspeed_env`` files and the environment exported to every node.

DeepSpeed reads ``~/.deepspeed_env`` and ``./.deepspeed_env`` (the file name can be
changed with ``DS_ENV_FILE``) and exports each ``NAME=VALUE`` line to the remote
nodes, along with variables of the launching shell whose names start with one of
a few prefixes (NCCL, PYTHON, UCX, ...). We do the same, but the values travel as
plain argv strings, never through a shell, so ``$``, quotes, spaces and ``=`` in a
value arrive unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["EXPORT_PREFIXES", "EnvFileError", "collect_exports", "env_file_paths", "parse_env_file"]

# Variables of the launching environment that DeepSpeed forwards to every node.
EXPORT_PREFIXES = ("MLFLOW", "NCCL", "PYTHON", "MV2", "UCX", "GLOO", "TORCH_", "OMP_NUM_THREADS")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EnvFileError(ValueError):
    """A ``.deepspeed_env`` line is not ``NAME=VALUE`` with a valid variable name."""


def parse_env_file(text: str, source: str = "<env file>") -> dict[str, str]:
    """Parse ``NAME=VALUE`` lines.

    The value is everything after the first ``=``, with surrounding whitespace removed
    (as DeepSpeed does) but nothing else: inner spaces, further ``=``, quotes and ``$``
    are kept literally (no shell evaluation). Blank lines and lines starting with ``#``
    are ignored; a leading ``export `` is accepted and dropped.
    """
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise EnvFileError(
                f"{source}:{lineno}: bad line {raw.strip()!r}; expected NAME=VALUE with NAME a variable name "
                "([A-Za-z_][A-Za-z0-9_]*)"
            )
        result[name] = value.strip()
    return result


def env_file_paths(environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> list[Path]:
    """Where env files are looked for, in order (later files override earlier ones):
    ``~/NAME`` then ``./NAME``, with ``NAME`` = ``$DS_ENV_FILE`` or ``.deepspeed_env``.
    An absolute ``DS_ENV_FILE`` names exactly one file."""
    environ = os.environ if environ is None else environ
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    if os.path.isabs(name):
        return [Path(name)]
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    paths = [home / name, Path(cwd or os.getcwd()) / name]
    # The same file twice (running from $HOME) is read once.
    return list(dict.fromkeys(p.resolve() for p in paths))


def collect_exports(environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> dict[str, str]:
    """Everything exported to each node: forwarded prefixes, ``PYTHONPATH`` with the
    launch directory first (so ``import my_module`` works there as here), then env files."""
    environ = os.environ if environ is None else environ
    cwd = str(cwd or os.getcwd())
    exports = {k: v for k, v in environ.items() if k.startswith(EXPORT_PREFIXES)}
    exports["PYTHONPATH"] = cwd + (os.pathsep + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    for path in env_file_paths(environ, cwd):
        if path.is_file():
            exports.update(parse_env_file(path.read_text(), source=str(path)))
    return exports
