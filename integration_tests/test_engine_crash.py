"""A rank SIGKILLed while the engine writes a checkpoint: the previous checkpoint stays intact and loadable."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from zero_testkit import DistributedTestError, run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 2},
    }


def _train(engine: object, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean()  # type: ignore[operator]
        engine.backward(loss)  # type: ignore[attr-defined]
        engine.step()  # type: ignore[attr-defined]


def _save_then_die(rank: int, world_size: int, ckpt: str) -> None:
    import zero_all
    from zero_all.checkpoint import layout

    engine, *_ = zero_all.initialize(model=_model(), config=_config())
    _train(engine, 2)
    engine.save_checkpoint(ckpt, tag="good", client_state={"steps": 2})
    _train(engine, 2)
    if rank == 1:
        real = layout.write_tensors

        def write_half_then_die(path: Path, tensors: dict, metadata: dict | None = None) -> dict:
            real(path, tensors, metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)  # half a shard on disk ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the rank dies mid-save
            return {}

        layout.write_tensors = write_half_then_die
    engine.save_checkpoint(ckpt, tag="doomed")


def _load(rank: int, world_size: int, ckpt: str) -> dict:
    import zero_all

    engine, *_ = zero_all.initialize(model=_model(), config=_config())
    path, client_state = engine.load_checkpoint(ckpt)
    return {"path": path, "client_state": client_state, "steps": engine.global_steps}


def test_sigkill_during_engine_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(DistributedTestError, match="rank 1"):
        run_distributed(_save_then_die, 2, str(tmp_path), timeout=60)
    assert (tmp_path / "latest").read_text() == "good"
    assert not (tmp_path / "doomed").exists()
    (r,) = run_distributed(_load, 1, str(tmp_path), timeout=120)
    assert r["path"].endswith("good") and r["client_state"] == {"steps": 2} and r["steps"] == 2
