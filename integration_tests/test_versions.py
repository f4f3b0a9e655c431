"""Lockstep versions: every package, every sibling pin and every __version__ equals VERSION."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
VERSION = (ROOT / "VERSION").read_text().strip()
OUR_NAMES = {
    "ds-native", "amp-scaler", "act-ckpt", "offload-io", "zero-shard",
    "onebit-comm", "pipe3d", "ds-launch", "ds-monitor", "zero-all",
}  # fmt: skip
PYPROJECTS = [ROOT / "native/pyproject.toml", *sorted(ROOT.glob("packages/*/pyproject.toml"))]


def test_all_ten_packages_exist() -> None:
    names = {tomllib.loads(p.read_text())["project"]["name"] for p in PYPROJECTS}
    assert names == OUR_NAMES


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: p.parent.name)
def test_package_version_and_sibling_pins_match(pyproject: Path) -> None:
    project = tomllib.loads(pyproject.read_text())["project"]
    assert project["version"] == VERSION
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    for req in requirements:
        name = re.split(r"[\[=<>!~ ;]", req, maxsplit=1)[0]
        if name in OUR_NAMES:
            # Version only: never a path or URL in published metadata.
            assert re.fullmatch(rf"{name}(\[[a-z,]+\])?=={re.escape(VERSION)}", req), f"{pyproject}: {req}"


def test_dunder_versions_match() -> None:
    inits = [*ROOT.glob("packages/*/src/*/__init__.py"), ROOT / "native/src/ds_native/_build.py"]
    for init in inits:
        found = re.search(r'(?m)^__version__ = "([^"]+)"', init.read_text())
        assert found, f"{init} has no __version__"
        assert found.group(1) == VERSION, init


def test_installed_versions_match() -> None:
    from importlib.metadata import version

    for name in OUR_NAMES:
        assert version(name) == VERSION, name
