"""Everything a GPU machine should check, in one command: build ds-native, run the CUDA tests, run the GPU
benchmarks, print one summary table. Made for machines lent for minutes, with no package index.

    python tools/gpu_check.py [--quick] [--out DIR] [--wheelhouse DIR] [--deadline 480]

Uses the interpreter it is run with and the torch installed there (no virtual environment, no dependency
resolution, no network):

1. wheels: installs tools/gpu_requirements.txt (pydantic and its parts, tqdm, hjson, pytest-timeout) from
   ``--wheelhouse`` (default build/gpu-wheelhouse, made by tools/make_gpu_wheelhouse.sh) into a private
   folder, build/gpu-check/site, with ``pip --no-index --no-deps`` (or by unpacking the wheels without pip);
2. build: compiles ds-native with CMake against this Python, for the GPUs present (their compute
   capability), and installs it into the same folder;
3. tests: ``pytest -m cuda`` per package, each in its own process (a crash in one does not hide the
   others), with a per-test timeout (pytest-timeout, else faulthandler's traceback dump) and a whole-run
   deadline; the packages come from their ``src/`` folders on PYTHONPATH;
4. benchmark: ``benchmarks/gpu.py`` (``--quick`` passed on);
5. a summary (printed, and written with every log, JUnit XML and the benchmark's JSON to ``--out``,
   default ``$OUT`` when set, else build/gpu-check/results).

Without a CUDA device it prints one line and exits 0 (``--rehearse`` runs every step anyway: the tests
then skip and the benchmark does its CPU ``--dry-run``, which checks this script on any machine).
Exit status: 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "gpu-check"
REQUIREMENTS = ROOT / "tools" / "gpu_requirements.txt"


@dataclass
class Step:
    """One row of the summary."""

    name: str
    ok: bool | None  # None: skipped
    detail: str
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


class Check:
    """The run's state: where things go, the deadline, the steps done so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.out = Path(args.out or os.environ.get("OUT") or WORK / "results").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.site = WORK / "site"
        self.steps: list[Step] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(self._pythonpath())
        self.env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        # zero-testkit stretches time limits on a loaded machine; a GPU machine running only this check is
        # not one, and the limits here must stay inside --deadline.
        self.env.setdefault("ZERO_TESTKIT_TIMEOUT_SCALE", "1")
        # cmake, ninja and friends installed as Python packages live next to the interpreter.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])

    def _pythonpath(self) -> list[str]:
        # ds_native comes from the site folder (built there), or with --skip-build from the environment.
        paths = [str(self.site)]
        paths += [str(p) for p in sorted(ROOT.glob("packages/*/src"))] + [str(ROOT / "testing" / "src")]
        old = os.environ.get("PYTHONPATH")
        return [*paths, *([old] if old else [])]

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.args.deadline - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], timeout: float, log: str, cwd: Path = ROOT) -> tuple[int | None, str]:
        """Run ``cmd`` with the check's environment; output to ``out/log``. Returns (exit code or None on
        timeout, output)."""
        timeout = max(1.0, min(timeout, self.remaining()))
        path = self.out / log
        with path.open("w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                proc = subprocess.run(
                    cmd, cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False
                )
                code: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                f.write(f"\n[gpu_check] {name}: killed after {timeout:.0f} s\n")
                code = None
        return code, path.read_text(errors="replace")

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        mark = {True: "ok", False: "FAILED", None: "skipped"}[step.ok]
        print(f"gpu_check: {step.name}: {mark}: {step.detail} ({step.seconds:.0f} s)", flush=True)
        return step


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---- 1. wheels ------------------------------------------------------------------------------------------------


def _requirements() -> list[tuple[str, str]]:
    out = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out.append((name.strip(), version.strip()))
    return out


def _wheel_fits(path: Path) -> bool:
    """Whether a wheel's tags suit this interpreter (for unpacking without pip; pip checks this itself)."""
    parts = path.name[: -len(".whl")].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    py_ok = any(t in (here, "py3", f"py{sys.version_info.major}{sys.version_info.minor}") for t in py.split("."))
    abi_ok = any(t in (here, "abi3", "none") for t in abi.split("."))
    machine = platform.machine()
    plat_ok = any(t == "any" or (t.startswith(("manylinux", "linux")) and t.endswith(machine)) for t in plat.split("."))
    return py_ok and abi_ok and plat_ok


def install_wheels(check: Check) -> Step:
    """The requirements into the private site folder, from the wheelhouse, without an index."""
    t0 = time.monotonic()
    shutil.rmtree(check.site, ignore_errors=True)
    check.site.mkdir(parents=True)
    wheelhouse = Path(check.args.wheelhouse or ROOT / "build" / "gpu-wheelhouse").resolve()
    wanted = _requirements()
    if not wheelhouse.is_dir() or not any(wheelhouse.glob("*.whl")):
        missing = [n for n in ("pydantic", "tqdm") if not _importable(n)]
        if missing:
            return Step(
                "wheels",
                False,
                f"{', '.join(missing)} missing and no wheelhouse at {wheelhouse}: run "
                "tools/make_gpu_wheelhouse.sh where there is network and bring the folder",
                time.monotonic() - t0,
            )
        return Step("wheels", True, "no wheelhouse; pydantic and tqdm already installed", time.monotonic() - t0)
    pip_ok = (
        subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0
    )
    if pip_ok:
        code, text = check.run(
            "wheels",
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-index",
                "--no-deps",
                "--find-links",
                str(wheelhouse),
                "--target",
                str(check.site),
                "-r",
                str(REQUIREMENTS),
            ],
            300,
            "wheels.log",
        )
        if code != 0:
            return Step("wheels", False, f"pip install from {wheelhouse} failed:\n{_tail(text)}", time.monotonic() - t0)
        how = "pip --no-index"
    else:
        names = {re.sub(r"[-_.]+", "_", n).lower() for n, _ in wanted}
        unpacked = 0
        for whl in sorted(wheelhouse.glob("*.whl")):
            if whl.name.split("-")[0].lower() in names and _wheel_fits(whl):
                with zipfile.ZipFile(whl) as z:
                    z.extractall(check.site)
                unpacked += 1
        how = f"unpacked {unpacked} wheels (no pip)"
    sys.path.insert(0, str(check.site))  # so this process sees what the tests will see
    importlib.invalidate_caches()
    missing = [n for n in ("pydantic", "tqdm") if not _importable(n)]
    if missing:
        return Step("wheels", False, f"still missing after installing: {', '.join(missing)}", time.monotonic() - t0)
    return Step("wheels", True, f"{len(wanted)} requirements from {wheelhouse.name} ({how})", time.monotonic() - t0)


# ---- 2. ds-native --------------------------------------------------------------------------------------------


def _cuda_archs(torch: Any, rehearse: bool) -> str:
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}{b}" for a, b in caps)
    return "90" if rehearse else "80;90"


def build_native(check: Check, torch: Any) -> Step:
    """CMake configure + build + install of native/ into the site folder, for this machine's GPUs."""
    t0 = time.monotonic()
    if check.args.skip_build:
        return Step("build ds-native", None, "--skip-build: using the ds_native already importable", 0.0)
    cmake = shutil.which("cmake", path=check.env["PATH"])
    if cmake is None:
        return Step("build ds-native", False, "cmake not found (pip install cmake ninja)", time.monotonic() - t0)
    if shutil.which("nvcc", path=check.env["PATH"]) is None and Path("/usr/local/cuda/bin/nvcc").exists():
        check.env.setdefault("CUDACXX", "/usr/local/cuda/bin/nvcc")
    archs = _cuda_archs(torch, check.args.rehearse)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "native" / "pyproject.toml").read_text(), re.M)
    build_dir = WORK / "native-build"
    configure = [
        cmake,
        "-S",
        str(ROOT / "native"),
        "-B",
        str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DDS_NATIVE_CUDA=ON",
        f"-DDS_NATIVE_CUDA_ARCHS={archs}",
        f"-DCMAKE_INSTALL_PREFIX={check.site}",
        f"-DSKBUILD_PROJECT_VERSION={version.group(1) if version else ''}",
    ]
    if shutil.which("ninja", path=check.env["PATH"]) and not (build_dir / "Makefile").exists():
        configure += ["-G", "Ninja"]
    jobs = str(os.cpu_count() or 4)
    for name, cmd, log in (
        ("configure", configure, "build-configure.log"),
        ("compile", [cmake, "--build", str(build_dir), "--parallel", jobs], "build-compile.log"),
        ("install", [cmake, "--install", str(build_dir)], "build-install.log"),
    ):
        code, text = check.run(f"build ({name})", cmd, check.args.build_timeout, log)
        if code != 0:
            why = "timed out" if code is None else f"exit {code}"
            return Step("build ds-native", False, f"cmake {name} {why}:\n{_tail(text)}", time.monotonic() - t0)
    shutil.copytree(
        ROOT / "native" / "src" / "ds_native",
        check.site / "ds_native",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "build_config.json"),
    )
    code, text = check.run(
        "build (import)",
        [sys.executable, "-c", "import ds_native, json; print(json.dumps(ds_native.build_info()))"],
        60,
        "build-import.log",
    )
    if code != 0:
        return Step("build ds-native", False, f"import ds_native failed:\n{_tail(text)}", time.monotonic() - t0)
    info = json.loads(text.strip().splitlines()[-1])
    ok = bool(info["cuda"])
    detail = (
        f"CUDA extension for sm_{'/'.join(info['cuda_archs'])} (nvcc {info['cuda_compiler_version']}), "
        f"CPU {','.join(info['cpu_isa_variants'])}"
        if ok
        else "built WITHOUT its CUDA extension (nvcc not found?)"
    )
    return Step("build ds-native", ok, detail, time.monotonic() - t0)


# ---- 3. tests ------------------------------------------------------------------------------------------------


def cuda_test_dirs() -> list[tuple[str, Path]]:
    """(package, tests folder) for every folder whose tests mention CUDA (the others have nothing to run)."""
    dirs = [("zero-testkit", ROOT / "testing" / "tests"), ("ds-native", ROOT / "native" / "tests")]
    dirs += [(p.parent.name, p) for p in sorted(ROOT.glob("packages/*/tests"))]
    return [(name, d) for name, d in dirs if any("cuda" in f.read_text(errors="replace") for f in d.glob("*.py"))]


def _junit(path: Path) -> tuple[dict[str, int], list[str]]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    if not path.exists():
        return counts, failures
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            first = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append(f"{name}: {first[0][:200] if first else '(no message)'}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def run_tests(check: Check) -> list[Step]:
    """``pytest -m cuda`` for each package, in its own process."""
    has_plugin = any(ep.value.startswith("zero_testkit") for ep in importlib.metadata.entry_points(group="pytest11"))
    timeout_opt = (
        ["--timeout", str(check.args.test_timeout)]
        if _importable("pytest_timeout")
        else ["-o", f"faulthandler_timeout={check.args.test_timeout}"]
    )
    steps = []
    for name, folder in cuda_test_dirs():
        t0 = time.monotonic()
        if check.remaining() < 20:
            steps.append(check.add(Step(f"tests {name}", None, "deadline reached before it could start")))
            continue
        junit = check.out / f"junit-{name}.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(folder.relative_to(ROOT)),
            "-m",
            "cuda",
            "-q",
            "-rfEs",
            "--continue-on-collection-errors",
            f"--junitxml={junit}",
            *timeout_opt,
        ]
        if not has_plugin:
            cmd += ["-p", "zero_testkit.pytest_plugin"]
        code, text = check.run(f"tests {name}", cmd, check.args.package_timeout, f"tests-{name}.log")
        counts, failures = _junit(junit)
        detail = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
        if code is None:
            ok, detail = False, detail + f"; KILLED at the time limit:\n{_tail(text)}"
        elif code == 5:
            ok, detail = True, "no CUDA tests selected"
        elif code != 0 and not failures:
            ok, detail = False, detail + f"; pytest exit {code}:\n{_tail(text)}"
        else:
            ok = code == 0
        steps.append(check.add(Step(f"tests {name}", ok, detail, time.monotonic() - t0, failures)))
    return steps


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- 4. benchmark --------------------------------------------------------------------------------------------


def run_benchmark(check: Check) -> Step:
    t0 = time.monotonic()
    if check.args.no_bench:
        return Step("benchmark", None, "--no-bench", 0.0)
    if check.remaining() < 30:
        return Step("benchmark", None, "deadline reached before it could start", 0.0)
    out = check.out / "gpu_bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--json", str(out)]
    cmd += ["--quick"] if check.args.quick else []
    cmd += ["--dry-run"] if check.args.rehearse and not _cuda_here() else []
    code, text = check.run("benchmark", cmd, check.args.bench_timeout, "bench.log")
    if code != 0:
        why = "timed out" if code is None else f"exit {code}"
        return Step("benchmark", False, f"{why}:\n{_tail(text)}", time.monotonic() - t0)
    return Step("benchmark", True, f"figures in {out.name}", time.monotonic() - t0)


# ---- 5. summary ----------------------------------------------------------------------------------------------


def _bench_report(path: Path) -> str:
    if not path.exists():
        return ""
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    result = json.loads(path.read_text())
    return mod.report(result) if result.get("cuda") or result.get("dry_run") else ""


def summary(check: Check, header: str) -> str:
    rows = []
    for s in check.steps:
        first = s.detail.splitlines()[0] if s.detail else ""
        rows.append(
            f"| {s.name} | {({True: 'ok', False: 'FAILED', None: 'skipped'})[s.ok]} | {first} | {s.seconds:.0f} |"
        )
    lines = [f"# gpu_check: {header}", "", "| step | result | detail | s |", "|---|---|---|---|", *rows, ""]
    total = time.monotonic() - check.start
    lines.append(f"total {total:.0f} s (deadline {check.args.deadline:.0f} s); logs, JUnit XML and JSON in {check.out}")
    failures = [f for s in check.steps for f in s.failures]
    details = [s for s in check.steps if s.ok is False and "\n" in s.detail]
    if failures:
        lines += ["", "## failed tests", *[f"- {f}" for f in failures]]
    for s in details:
        lines += ["", f"## {s.name}", "```", s.detail, "```"]
    bench = _bench_report(check.out / "gpu_bench.json")
    if bench:
        lines += ["", "## benchmark", "", bench]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="results folder (default: $OUT, else build/gpu-check/results)")
    ap.add_argument("--wheelhouse", help="wheels for the missing requirements (default build/gpu-wheelhouse)")
    ap.add_argument("--quick", action="store_true", help="benchmarks/gpu.py --quick")
    ap.add_argument("--rehearse", action="store_true", help="run every step even without a CUDA device")
    ap.add_argument("--skip-build", action="store_true", help="use the ds_native already importable")
    ap.add_argument("--no-bench", action="store_true", help="skip benchmarks/gpu.py")
    ap.add_argument("--deadline", type=float, default=480, help="seconds for the whole check (default 480)")
    ap.add_argument("--test-timeout", type=int, default=240, help="seconds per test (default 240)")
    ap.add_argument("--package-timeout", type=float, default=300, help="seconds per package's tests")
    ap.add_argument("--build-timeout", type=float, default=420, help="seconds per build command")
    ap.add_argument("--bench-timeout", type=float, default=300, help="seconds for the benchmark")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"gpu_check: torch is not importable here ({exc}); nothing to check")
        return 0
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif not torch.cuda.is_available():
        reason = f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    if reason and not args.rehearse:
        print(f"gpu_check: no CUDA here ({reason}); nothing to check")
        return 0
    check = Check(args)
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpus = f"none: REHEARSAL ({reason})"
    header = f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), GPUs: {gpus}"
    print(f"gpu_check: {header}", flush=True)
    wheels = check.add(install_wheels(check))
    build = check.add(build_native(check, torch)) if wheels.ok is not False else None
    if wheels.ok is False or (build is not None and build.ok is False):
        check.add(Step("tests", None, "not run: the steps above failed"))
    else:
        run_tests(check)
    check.add(run_benchmark(check) if build is None or build.ok is not False else Step("benchmark", None, "not run"))
    text = summary(check, header)
    (check.out / "summary.md").write_text(text)
    (check.out / "summary.json").write_text(json.dumps([s.__dict__ for s in check.steps], indent=2, default=str) + "\n")
    print("\n" + text)
    return 0 if all(s.ok is not False for s in check.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
