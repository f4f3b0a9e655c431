"""The GPU check's machinery on the CPU: benchmarks/gpu.py (arguments, tables, goals, its no-CUDA and dry-run
paths) and tools/gpu_check.py (requirements, wheel tags, JUnit parsing, the no-CUDA line), so that the one
command a GPU machine gets for minutes has already run everything it can here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from zero_testkit import cuda_skip_reason

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load(ROOT / "benchmarks" / "gpu.py", "gpu_bench")


@pytest.fixture(scope="module")
def check() -> ModuleType:
    return _load(ROOT / "tools" / "gpu_check.py", "gpu_check")


def test_presets_and_overrides(bench: ModuleType) -> None:
    full = bench.parse_args([])
    assert full.mode == "full" and full.sizes == [100_000_000, 500_000_000, 1_000_000_000]
    assert full.gpt == {"layers": 24, "d_model": 1024, "heads": 16, "vocab": 50304, "seq": 1024, "batch": 8}
    quick = bench.parse_args(["--quick", "--layers", "3", "--sizes", "2e6"])
    assert quick.mode == "quick" and quick.gpt["layers"] == 3 and quick.sizes == [2_000_000]
    assert bench.parse_args(["--dry-run"]).mode == "dry-run"
    with pytest.raises(SystemExit):
        bench.parse_args(["--d-model", "100", "--heads", "16"])  # not a multiple
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "10", "--tensors", "64"])


def test_gpt_of_the_full_preset_has_about_350m_parameters(bench: ModuleType, monkeypatch) -> None:
    import torch

    spec = bench.parse_args([]).gpt
    # Shapes only: meta tensors, and no initialisers (on meta they import torch's decompositions: seconds).
    for name in ("normal_", "zeros_", "uniform_", "kaiming_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, **k: t)
    with torch.device("meta"):
        model = bench._gpt(spec, torch.device("meta"))
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert 340e6 < n < 370e6
    # 6·N + 12·L·d·T FLOPs per token, over batch × seq tokens.
    assert bench.model_flops_per_step(n, spec) == 8 * 1024 * (6 * n + 12 * 24 * 1024 * 1024)


def test_table_and_goals(bench: ModuleType) -> None:
    table = bench.format_table(["a", "bb"], [[1.23456, None], ["x", 1234.5]])
    assert table.splitlines() == ["| a    | bb   |", "|------|------|", "| 1.23 | -    |", "| x    | 1234 |"]
    adam = [
        {"size": 10**9, "impl": "ds_native FusedAdam", "ms": 6.0, "gbps": 28e9 / 6e-3 / 1e9},
        {"size": 10**9, "impl": "torch AdamW fused", "ms": 6.6, "gbps": 28e9 / 6.6e-3 / 1e9},
    ]
    engine = [{"variant": "torch", "vs_torch": 1.0}, {"variant": "ZeRO-2", "vs_torch": 1.08}]
    goals = bench.goals(adam, 5000.0, engine)
    assert goals["adam 1B: FusedAdam speed / torch fused"] == {"value": pytest.approx(1.1), "met": True}
    # 28 B x 1e9 in 6 ms = 4667 GB/s: 93% of a 5000 GB/s copy meets the 85% goal, 47% of 10000 does not.
    assert goals["adam 1B: FusedAdam GB/s / copy GB/s"] == {"value": pytest.approx(4666.67 / 5000), "met": True}
    slow = bench.goals(adam, 10000.0, engine)["adam 1B: FusedAdam GB/s / copy GB/s"]
    assert slow == {"value": pytest.approx(4666.67 / 10000), "met": False}
    assert goals["engine ZeRO-2: step / torch step"] == {"value": 1.08, "met": False}
    assert bench.count(355e6) == "355M" and bench.count(1e9) == "1B" and bench.count(2e5) == "200K"


def test_without_cuda_one_line_and_a_json_that_says_so(bench: ModuleType, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "_no_cuda_reason", lambda: "no device (test)")
    out = tmp_path / "g.json"
    assert bench.main(["--json", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "benchmarks/gpu.py: no CUDA here (no device (test)); nothing measured"
    ]
    data = json.loads(out.read_text())
    assert data["cuda"] is False and data["reason"] == "no device (test)"


def test_dry_run_of_the_adam_part(bench: ModuleType, tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.json"
    assert bench.main(["--dry-run", "--only", "adam", "--sizes", "4096", "--tensors", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["engine"] == []
    impls = {r["impl"]: r for r in data["adam"]}
    assert impls["ds_native FusedAdam"]["skipped"] == "CUDA tensors only"  # the dry run is on the CPU
    assert impls["torch AdamW fused"]["ms"] > 0 and impls["torch AdamW foreach"]["gbps"] > 0
    assert "DRY RUN" in capsys.readouterr().out


def test_requirements_and_wheel_tags(check: ModuleType, monkeypatch) -> None:
    names = dict(check._requirements())
    assert {"pydantic", "pydantic-core", "typing-extensions", "tqdm", "pytest-timeout"} <= set(names)
    assert all(v for v in names.values())  # pinned
    monkeypatch.setattr(check.platform, "machine", lambda: "x86_64")
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert check._wheel_fits(Path("pydantic-2.0-py3-none-any.whl"))
    assert check._wheel_fits(Path(f"pydantic_core-2.5-{here}-{here}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"))
    assert not check._wheel_fits(Path("pydantic_core-2.5-cp39-cp39-manylinux2014_x86_64.whl"))
    assert not check._wheel_fits(Path(f"pydantic_core-2.5-{here}-{here}-manylinux2014_aarch64.whl"))


def test_junit_summary(check: ModuleType, tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="native.tests.test_x" name="test_ok"/>'
        '<testcase classname="native.tests.test_x" name="test_skip"><skipped message="no gpu"/></testcase>'
        '<testcase classname="native.tests.test_x" name="test_bad"><failure message="assert 1 == 2">tb</failure>'
        "</testcase></testsuite></testsuites>"
    )
    counts, failures = check._junit(xml)
    assert counts == {"passed": 1, "failed": 1, "skipped": 1}
    assert failures == ["native.tests.test_x::test_bad: assert 1 == 2"]
    dirs = dict(check.cuda_test_dirs())
    assert {"ds-native", "zero-shard", "zero-all", "amp-scaler", "act-ckpt"} <= set(dirs)


@pytest.mark.skipif(cuda_skip_reason() is None, reason="on a GPU machine this would run the whole check")
def test_gpu_check_without_cuda_is_one_line_and_success() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "nothing to check" in proc.stdout


def test_wheelhouse_script_refuses_unknown_options() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "make_gpu_wheelhouse.sh"), "--bogus"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
