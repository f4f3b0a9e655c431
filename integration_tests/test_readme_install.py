"""The README's one-package install: with the CPU torch installed first, no CUDA torch is pulled in.

`-c constraints.txt` pins torch's version only; PyPI's torch==2.13.0 is the CUDA build on
Linux. The README therefore installs the CPU wheel first (from a local folder here) and then
the package; this test resolves the second step (uv --dry-run: nothing is built) exactly as
the README writes it, without --find-links, and checks that torch is kept and no nvidia-*
package appears.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _local_torch_dirs() -> list[str]:
    """Folders holding a local torch wheel: pip's find-links (env or config)."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    if not links and shutil.which("pip"):
        out = subprocess.run(["pip", "config", "get", "global.find-links"], capture_output=True, text=True)
        links = out.stdout.split() if out.returncode == 0 else []
    return [d for d in links if Path(d).is_dir() and any(Path(d).glob("torch-*.whl"))]


@pytest.mark.timeout(300)
def test_one_package_install_keeps_the_cpu_torch(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    dirs = _local_torch_dirs()
    if uv is None or not dirs:
        pytest.skip("needs uv and a local torch wheel folder (pip's find-links) to install the CPU torch from")
    # No find-links from pip's or uv's environment, and this test's own venv (not the session's:
    # nox points uv at its environment, so the target is named explicitly).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "VIRTUAL_ENV"))}
    venv = tmp_path / "venv"
    env["VIRTUAL_ENV"] = str(venv)
    subprocess.run([uv, "venv", "-q", str(venv)], check=True, env=env, cwd=ROOT)
    target = ["--python", str(venv / "bin" / "python")]
    first = subprocess.run(
        [uv, "pip", "install", "-q", *target, "-c", "constraints.txt", "--find-links", dirs[0], "torch"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [uv, "pip", "install", "--dry-run", *target, "-c", "constraints.txt", "./packages/offload-io"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if second.returncode != 0 and ("network" in second.stderr.lower() or "connect" in second.stderr.lower()):
        pytest.skip(f"no package index reachable: {second.stderr.strip()[-300:]}")
    assert second.returncode == 0, second.stderr
    plan = second.stdout + second.stderr
    assert str(venv) in plan, plan  # resolved for the fresh venv
    assert "+ offload-io" in plan and "+ ds-native" in plan
    assert "+ torch" not in plan and "nvidia-" not in plan, plan
