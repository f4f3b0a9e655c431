"""`ds-monitor plot`: a recorded run (CSV or TensorBoard) becomes a PNG with the expected panels."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from ds_monitor import MonitorMaster, tags
from ds_monitor.cli import main
from ds_monitor.plot import load_runs, plot_runs
from ds_monitor.runlog import RunDirError

matplotlib_image = pytest.importorskip("matplotlib.image")


def _record(root: Path, job: str, tensorboard: bool, csv: bool, scale: float = 1.0, steps: int = 30) -> Path:
    sections = {
        "tensorboard": {"enabled": tensorboard, "output_path": str(root), "job_name": job},
        "csv_monitor": {"enabled": csv, "output_path": str(root), "job_name": job},
    }
    with MonitorMaster(**sections, rank=0) as monitor:
        for step in range(1, steps + 1):
            samples = step * 8
            monitor.write_events(
                [
                    (tags.TRAIN_LOSS, scale * (2.0 * math.exp(-step / 10) + 0.1), samples),
                    (tags.LR, 1e-3 * min(1.0, step / 5), samples),
                    (tags.LOSS_SCALE, 2.0 ** (16 - step // 10), samples),
                    (tags.SAMPLES_PER_SEC, 100.0 + step % 3, samples),
                ]
            )
    return root / job


def _panels(fig) -> dict[str, tuple[str, str]]:
    return {ax.get_title(): (ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.get_visible()}


# DeepSpeed's Train/Samples/* metrics are logged against samples seen (here 8 per step).
EXPECTED = {
    "Loss": ("samples", "loss"),
    "Learning rate": ("samples", "learning rate"),
    "Throughput": ("samples", "samples/s"),
    "Loss scale": ("samples", "loss scale"),
}


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_plot_a_recorded_run(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = _record(tmp_path / "logs", "job", tensorboard=kind == "tensorboard", csv=kind == "csv")
    runs = load_runs([run])
    assert len(runs) == 1
    loss = next(s for name, s in runs[0].metrics.items() if "train_loss" in name)
    assert loss.steps == [8 * s for s in range(1, 31)]
    assert loss.values[0] == pytest.approx(2.0 * math.exp(-0.1) + 0.1, rel=1e-6)
    fig = plot_runs(runs)
    assert _panels(fig) == EXPECTED
    assert fig.axes[3].get_yscale() == "log"
    out = tmp_path / "plots" / "loss.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert "panels: Loss, Learning rate, Throughput, Loss scale" in capsys.readouterr().out
    image = matplotlib_image.imread(out)
    assert image.shape[0] == 640 and image.shape[1] == 1200  # 2 × 2 panels of 6 × 3.2 in at 100 dpi
    assert image[..., :3].std() > 0.05  # not blank


def test_several_runs_are_overlaid(tmp_path: Path) -> None:
    _record(tmp_path / "sweep", "lr-a", tensorboard=False, csv=True)
    _record(tmp_path / "sweep", "lr-b", tensorboard=True, csv=False, scale=0.5)
    runs = load_runs([tmp_path / "sweep"])  # a folder above two runs
    assert [r.label for r in runs] == ["lr-a", "lr-b"]
    fig = plot_runs(runs, title="sweep")
    loss_ax = next(ax for ax in fig.axes if ax.get_title() == "Loss")
    assert [line.get_label() for line in loss_ax.get_lines()] == ["lr-a", "lr-b"]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["lr-a", "lr-b"]
    first, second = (line.get_ydata() for line in loss_ax.get_lines())
    assert second[0] == pytest.approx(first[0] * 0.5, rel=1e-6)


def test_extra_metric_panel_and_unknown_metric(tmp_path: Path) -> None:
    run = _record(tmp_path, "job", tensorboard=False, csv=True, steps=3)
    with MonitorMaster(csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "job"}, rank=0) as m:
        m.write_events([("Eval/perplexity", 12.0, 8), ("Eval/perplexity", 11.0, 16)])
    runs = load_runs([run])
    fig = plot_runs(runs, metrics=["Eval_perplexity"])
    assert _panels(fig)["Eval_perplexity"] == ("step", "Eval_perplexity")
    with pytest.raises(RunDirError, match="metric 'nope' is not in the run"):
        plot_runs(runs, metrics=["nope"])


def test_missing_and_empty_run_dirs_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert f"run directory '{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no CSV files or TensorBoard event files" in err and str(tmp_path / "empty") in err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "Train_Samples_lr.csv").write_text("step,lr\n")
    assert main(["plot", str(tmp_path / "blank"), "--out", str(tmp_path / "x.png")]) == 2
    assert "hold no scalar values yet" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_console_script_entry_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ds_monitor", "plot", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_csv_that_is_not_utf8_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _record(tmp_path, "job", tensorboard=False, csv=True, steps=3)
    bad = run / "notes.csv"
    bad.write_bytes("step,value\n1,caf\xe9\n".encode("latin-1"))
    assert main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"'{bad}' is not a UTF-8 text file" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install_from_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = load_runs([_record(tmp_path, "job", tensorboard=False, csv=True, steps=2)])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(ImportError, match=r"`pip install matplotlib`, .*'./packages/ds-monitor\[plot\]'"):
        plot_runs(runs)
