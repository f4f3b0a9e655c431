"""TensorBoard and CSV monitors read back with their own readers; rank gating; missing-library errors."""

from __future__ import annotations

import csv
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from ds_monitor import CSVMonitorConfig, MonitorMaster, TensorBoardConfig
from ds_monitor.monitors import CometMonitor, CSVMonitor, WandbMonitor
from zero_testkit import run_distributed

EVENTS = [
    (tag, value, step)
    for step in (8, 16, 24)
    for tag, value in (
        ("Train/Samples/train_loss", 2.0 / step),
        ("Train/Samples/lr", 1e-3 * step),
        ("Train/Samples/loss_scale", 65536.0),
    )
]


def _sections(root: Path, job: str = "job") -> dict:
    return {
        "tensorboard": {"enabled": True, "output_path": str(root), "job_name": job},
        "csv_monitor": {"enabled": True, "output_path": str(root), "job_name": job},
    }


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_tensorboard_events_read_back(tmp_path: Path) -> None:
    with MonitorMaster(**_sections(tmp_path)) as monitor:
        assert monitor.enabled and monitor.is_writer
        monitor.write_events(EVENTS[:3])
        monitor.write_events(EVENTS[3:])  # tensors are accepted too
        monitor.write_events([("Train/Samples/grad_norm", torch.tensor(0.5), 24)])
    acc = EventAccumulator(str(tmp_path / "job"), size_guidance={SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {
        "Train/Samples/train_loss",
        "Train/Samples/lr",
        "Train/Samples/loss_scale",
        "Train/Samples/grad_norm",
    }
    for tag in ("Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/loss_scale"):
        expected = [(s, v) for t, v, s in EVENTS if t == tag]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert [(e.step, e.value) for e in acc.Scalars("Train/Samples/grad_norm")] == [(24, 0.5)]


def test_from_ds_config_and_config_text(tmp_path: Path) -> None:
    ds_config = {"train_batch_size": 8, **_sections(tmp_path, job="from_config")}
    ds_config["csv_monitor"]["enabled"] = False
    with MonitorMaster.from_config(ds_config, rank=0) as monitor:
        assert [type(m).__name__ for m in monitor.monitors] == ["TensorBoardMonitor"]
        monitor.update_config({"train_batch_size": 8})
        monitor.write_events([("loss", 1.0, 1)])
    acc = EventAccumulator(str(tmp_path / "from_config"))
    acc.Reload()
    assert "DeepSpeed/config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("DeepSpeed/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"train_batch_size": 8' in text
    with pytest.raises(ValueError, match=r"tensorboard\.job: Extra inputs are not permitted"):
        MonitorMaster.from_config({"tensorboard": {"job": "x"}})


def test_csv_layout_matches_deepspeed(tmp_path: Path) -> None:
    with MonitorMaster(csv_monitor=CSVMonitorConfig(enabled=True, output_path=str(tmp_path), job_name="job")) as m:
        m.write_events(EVENTS)
        m.update_config({"train_batch_size": 8, "zero_optimization": {"stage": 2}})
    files = sorted(os.listdir(tmp_path / "job"))
    assert files == [
        "Train_Samples_loss_scale.csv",
        "Train_Samples_lr.csv",
        "Train_Samples_train_loss.csv",
        "deepspeed_config.csv",
    ]
    rows = _read_csv(tmp_path / "job" / "Train_Samples_lr.csv")
    assert rows[0] == ["step", "lr"]
    assert [(int(s), float(v)) for s, v in rows[1:]] == [(8, 8e-3), (16, 16e-3), (24, 24e-3)]  # exact: repr()
    config_rows = _read_csv(tmp_path / "job" / "deepspeed_config.csv")
    assert config_rows[0] == ["key", "value"] and ["train_batch_size", "8"] in config_rows


def test_csv_resume_appends_without_second_header(tmp_path: Path) -> None:
    cfg = CSVMonitorConfig(enabled=True, output_path=str(tmp_path), job_name="job")
    first = CSVMonitor(cfg)
    first.write_events([("loss", 1.0, 1), ("loss", 0.9, 2)])
    first.close()
    path = tmp_path / "job" / "loss.csv"
    with open(path, "a") as handle:
        handle.write("3,0.8")  # a crash in the middle of a row: no newline
    resumed = CSVMonitor(cfg)
    resumed.write_events([("loss", 0.85, 3)])
    resumed.close()
    assert _read_csv(path) == [["step", "loss"], ["1", "1.0"], ["2", "0.9"], ["3", "0.85"]]


def test_non_zero_rank_writes_nothing(tmp_path: Path) -> None:
    monitor = MonitorMaster(**_sections(tmp_path), rank=1)
    assert monitor.enabled and not monitor.is_writer
    monitor.write_events(EVENTS)
    monitor.close()
    assert not (tmp_path / "job").exists()


def _two_rank_run(rank: int, world_size: int, root: str) -> list[str]:
    import torch.distributed as dist

    monitor = MonitorMaster(**_sections(Path(root)))  # rank comes from torch.distributed
    monitor.write_events([("Train/Samples/train_loss", float(rank + 1), 1)])
    monitor.close()
    dist.barrier()
    return sorted(os.listdir(os.path.join(root, "job"))) if rank == 0 else []


def test_only_rank_zero_writes_in_a_two_rank_run(tmp_path: Path) -> None:
    files, _ = run_distributed(_two_rank_run, 2, str(tmp_path), timeout=90)
    assert len([f for f in files if f.startswith("events.out.tfevents.")]) == 1
    assert "Train_Samples_train_loss.csv" in files
    rows = _read_csv(tmp_path / "job" / "Train_Samples_train_loss.csv")
    assert rows == [["step", "train_loss"], ["1", "1.0"]]  # rank 0's value, once
    acc = EventAccumulator(str(tmp_path / "job"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("Train/Samples/train_loss")] == [1.0]


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from ds_monitor.config import CometConfig, WandbConfig

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    monkeypatch.setitem(sys.modules, "comet_ml", None)
    with pytest.raises(
        ImportError,
        match=r"`pip install wandb`, or from a zero-all checkout `uv pip install -c constraints.txt './packages/ds-monitor\[wandb\]'`",
    ):
        WandbMonitor(WandbConfig(enabled=True))
    with pytest.raises(ImportError, match=r"`pip install comet_ml`, .*'./packages/ds-monitor\[comet\]'"):
        CometMonitor(CometConfig(enabled=True))


def test_tensorboard_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match=r"`pip install tensorboard`, .*'./packages/ds-monitor\[tensorboard\]'"):
        MonitorMaster(tensorboard=TensorBoardConfig(enabled=True, output_path=str(tmp_path)), rank=0)


class _FakeExperiment:
    def __init__(self, **kwargs: object) -> None:
        self.start_kwargs = kwargs
        self.name = None
        self.metrics: list[tuple[str, float, int]] = []
        self.ended = False

    def set_name(self, name: str) -> None:
        self.name = name

    def log_metric(self, name: str, value: float, step: int) -> None:
        self.metrics.append((name, value, step))

    def log_parameters(self, params: dict) -> None:
        self.params = params

    def end(self) -> None:
        self.ended = True


def test_comet_sends_each_metric_every_samples_log_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("comet_ml")
    fake.start = lambda **kwargs: _FakeExperiment(**kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "comet_ml", fake)
    master = MonitorMaster(
        comet={"enabled": True, "samples_log_interval": 16, "online": False, "experiment_name": "exp", "project": "p"},
        rank=0,
    )
    (monitor,) = master.monitors
    assert isinstance(monitor, CometMonitor)
    exp = monitor.experiment
    assert exp.name == "exp" and exp.start_kwargs["online"] is False and exp.start_kwargs["project"] == "p"
    for step in range(8, 57, 8):
        master.write_events([("loss", 1.0 / step, step), ("lr", 0.1, step)])
    master.close()
    assert [s for n, _, s in exp.metrics if n == "loss"] == [8, 24, 40, 56]
    assert [s for n, _, s in exp.metrics if n == "lr"] == [8, 24, 40, 56]
    assert exp.ended


def test_bad_value_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    m = MonitorMaster(csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "job"}, rank=0)
    with pytest.raises(TypeError, match=r"'Train/Samples/samples_per_sec' at step 8: value must be a number"):
        m.write_events([("loss", 1.0, 8), ("Train/Samples/samples_per_sec", print, 8)])
    m.close()
    assert not (tmp_path / "job" / "loss.csv").exists()
