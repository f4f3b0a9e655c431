"""zero-all's engine with the tensorboard and csv_monitor sections of a ds_config, on 2 gloo ranks.

The event files are read back with TensorBoard's own EventAccumulator, the CSV files with csv,
and `ds-monitor plot` draws the run: the engine, ds-monitor and TensorBoard agree end to end.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

pytest.importorskip("zero_all")
pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from ds_monitor import tags
from zero_testkit import run_distributed

STEPS = 6
MICRO_BATCH = 2


def _train(rank: int, world_size: int, root: str) -> list[float]:
    import torch

    import zero_all

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.net(x), y)

    torch.manual_seed(0)
    model = Model()
    sections = {"enabled": True, "output_path": os.path.join(root, "logs"), "job_name": "run"}
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
        "steps_per_print": 100,
        "tensorboard": dict(sections),
        "csv_monitor": dict(sections),
    }
    engine, _, _, _ = zero_all.initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(1 + rank)
    losses = []
    for _ in range(STEPS):
        x = torch.randn(MICRO_BATCH, 8, generator=gen)
        loss = engine(x, x.sum(1, keepdim=True))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if hasattr(engine, "destroy"):
        engine.destroy()
    return losses


def test_engine_writes_tensorboard_and_csv_on_rank_zero(tmp_path: Path) -> None:
    run_distributed(_train, 2, str(tmp_path), timeout=180)
    run_dir = tmp_path / "logs" / "run"
    files = os.listdir(run_dir)
    assert len([f for f in files if f.startswith("events.out.tfevents.")]) == 1, files  # rank 0 only

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {tags.TRAIN_LOSS, tags.LR} <= scalars, scalars
    global_batch = MICRO_BATCH * 2
    loss_steps = [e.step for e in acc.Scalars(tags.TRAIN_LOSS)]
    assert loss_steps == [global_batch * (i + 1) for i in range(STEPS)]  # logged against samples seen
    assert all(e.value == pytest.approx(1e-2) for e in acc.Scalars(tags.LR))

    with open(run_dir / "Train_Samples_train_loss.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "train_loss"]
    tb_losses = [e.value for e in acc.Scalars(tags.TRAIN_LOSS)]
    assert [float(v) for _, v in rows[1:]] == pytest.approx(tb_losses, rel=1e-6)

    from ds_monitor.cli import main

    out = tmp_path / "loss.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
