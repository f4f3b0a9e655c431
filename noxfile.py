"""CI and developer sessions. `nox -l` lists them; `nox` runs what CI runs.

Every session builds its own environment with uv (fast, and uv's cache makes
torch a hard-link, not a download). Siblings come from this checkout through
each package's [tool.uv.sources]; ds-native is compiled once and reused from
uv's cache until one of its sources changes (its [tool.uv] cache-keys).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["lint", "tests", "integration"]

# The ten packages and their folders, in dependency order.
PACKAGES = {
    "ds-native": "native",
    "amp-scaler": "packages/amp-scaler",
    "act-ckpt": "packages/act-ckpt",
    "offload-io": "packages/offload-io",
    "zero-shard": "packages/zero-shard",
    "onebit-comm": "packages/onebit-comm",
    "pipe3d": "packages/pipe3d",
    "ds-launch": "packages/ds-launch",
    "ds-monitor": "packages/ds-monitor",
    "zero-all": "packages/zero-all",
}
TEST_TOOLS = ["pytest>=8", "pytest-timeout", "./testing"]


def _find_links() -> list[str]:
    """pip's find-links (where a local torch wheel may live), handed to uv too."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    if not links and shutil.which("pip"):
        out = subprocess.run(["pip", "config", "get", "global.find-links"], capture_output=True, text=True)
        links = out.stdout.split() if out.returncode == 0 else []
    return [arg for link in links for arg in ("--find-links", link)]


def _install(session: nox.Session, *targets: str) -> None:
    session.install("-c", str(ROOT / "constraints.txt"), *_find_links(), *targets)


@nox.session
@nox.parametrize("package", list(PACKAGES), ids=list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """One package alone: install only it (siblings via its requirements) and run its tests."""
    path = PACKAGES[package]
    _install(session, f"./{path}[test]", *TEST_TOOLS)
    session.run("python", "-m", "pytest", f"{path}/tests", *session.posargs)


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package tests, repository checks and the test helper's own tests, with everything installed."""
    _install(session, "./packages/zero-all[test,hf]", "./packages/ds-monitor[tensorboard,plot]", *TEST_TOOLS)
    session.run("python", "-m", "pytest", "integration_tests", "testing/tests", *session.posargs)


@nox.session(venv_backend="uv")
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    session.install("ruff==0.14.0")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: the Hugging Face workflow on a tiny Llama (examples/demo.py).

    2 CPU workers on gloo through ds-launch (with GPUs: one rank per GPU, NCCL), ZeRO-2, bf16, a
    few hundred steps with a progress bar, perplexity before and after, a checkpoint, the HF
    export, TensorBoard events and a loss plot; everything lands in ./demo-output, and the
    session ends by printing the absolute paths. `-- --steps N` changes the length.
    """
    _install(session, "./packages/zero-all[hf]", "./packages/ds-monitor[tensorboard,plot]")
    session.run("python", str(ROOT / "examples" / "demo.py"), "--out", str(ROOT / "demo-output"), *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark in benchmarks/, side by side with its peers in one run.

    Quick sizes unless `-- --full`. `-- --deepspeed` also installs DeepSpeed (its CPU ops build
    at first use, minutes) so the benchmarks add its rows; they do whenever it is importable.
    `-- --only NAME` runs one script (e.g. `--only cpu_adam`).
    """
    _install(session, "./packages/zero-all", "./packages/ds-monitor[tensorboard,plot]", "numpy")
    if "--deepspeed" in session.posargs:
        _install(session, "deepspeed")
    session.env.setdefault("DS_ACCELERATOR", "cpu")
    quick = [] if "--full" in session.posargs else ["--quick"]
    only = session.posargs[session.posargs.index("--only") + 1] if "--only" in session.posargs else None
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if only is None or script.stem == only:
            session.run("python", str(script), *quick, "--json", str(out / f"{script.stem}.json"))
