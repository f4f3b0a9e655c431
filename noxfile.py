"""CI and developer sessions. `nox -l` lists them; `nox` runs what CI runs.

Every session builds its own environment with uv (fast, and uv's cache makes
torch a hard-link, not a download). Siblings come from this checkout through
each package's [tool.uv.sources]; ds-native is compiled once and reused from
uv's cache until one of its sources changes (its [tool.uv] cache-keys).

The test sessions also make sure of the Debian packages the tests use (.ci/apt-packages.txt:
sshd and pdsh for the two-host launcher tests, libaio/liburing for ds-native's async IO):
missing ones are installed with apt-get when nox runs as root or with password-less sudo, so
`pip install nox uv && nox` works alone on a fresh machine. Elsewhere the tests that need
them skip, saying what to install; with CI set (as .ci/run does) a missing package fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


_APT_LIST = ROOT / ".ci" / "apt-packages.txt"
_apt_checked = False


def _missing_debian_packages() -> list[str]:
    wanted = [ln.strip() for ln in _APT_LIST.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    missing = []
    for pkg in wanted:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in out.stdout:
            missing.append(pkg)
    return missing


def _ensure_debian_packages(session: nox.Session) -> None:
    """Install the missing packages of .ci/apt-packages.txt once per nox run (root or sudo -n only)."""
    global _apt_checked
    if _apt_checked:
        return
    _apt_checked = True
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        session.log("not a Debian/Ubuntu system: tests needing .ci/apt-packages.txt skip where it is missing")
        return
    missing = _missing_debian_packages()
    if not missing:
        return
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
            sudo = ["sudo"]
        else:
            msg = (
                f"Debian packages missing: {' '.join(missing)}; the tests that need them skip. "
                f"Install them with: sudo apt-get install {' '.join(missing)}"
            )
            if os.environ.get("CI"):
                session.error(msg)
            session.warn(msg)
            return
    session.log(f"installing Debian packages the tests use: {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run(*sudo, "apt-get", "update", "-qq", external=True, env=env)
    session.run(*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, external=True, env=env)


def _install(session: nox.Session, *targets: str) -> None:
    session.install("-c", str(ROOT / "constraints.txt"), *_find_links(), *targets)


@nox.session
@nox.parametrize("package", list(PACKAGES), ids=list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """One package alone: install only it (siblings via its requirements) and run its tests."""
    path = PACKAGES[package]
    _ensure_debian_packages(session)
    _install(session, f"./{path}[test]", *TEST_TOOLS)
    session.run("python", "-m", "pytest", f"{path}/tests", *session.posargs)


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package tests, repository checks and the test helper's own tests, with everything installed."""
    _ensure_debian_packages(session)
    _install(session, "./packages/zero-all[test,hf,trainer]", "./packages/ds-monitor[tensorboard,plot]", *TEST_TOOLS)
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
    _install(session, "./packages/zero-all[trainer]", "./packages/ds-monitor[tensorboard,plot]", "numpy")
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


def _python_with_torch() -> str | None:
    """The interpreter for the GPU check: $GPU_CHECK_PYTHON, else nox's own, else python3/python on PATH,
    whichever first imports torch (nox itself often lives in a pipx venv without it)."""
    candidates = [os.environ.get("GPU_CHECK_PYTHON"), sys.executable, shutil.which("python3"), shutil.which("python")]
    for py in dict.fromkeys(c for c in candidates if c):
        if subprocess.run([py, "-c", "import torch"], capture_output=True, check=False).returncode == 0:
            return py
    return None


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The GPU machine's one command: tools/gpu_check.py with an existing interpreter (no new venv).

    Builds ds-native in place against the torch that is there, runs the CUDA tests per package and
    benchmarks/gpu.py, prints one summary table (see docs/development.md, "On a GPU machine"). Arguments
    after ``--`` go to the script (``--quick``, ``--out DIR``, ``--wheelhouse DIR``). Without CUDA: one
    line, success.
    """
    python = _python_with_torch()
    if python is None:
        session.log("gpu: no Python with torch here (set GPU_CHECK_PYTHON); nothing to check")
        return
    session.run(python, str(ROOT / "tools" / "gpu_check.py"), *session.posargs, external=True)
