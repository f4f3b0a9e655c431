"""The seed-style DeepSpeed config (comments, fp16, ZeRO-2 + CPU optimizer offload, partitioned CPU
activation checkpointing, TensorBoard) loads as it is and trains through initialize() on 2 gloo ranks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from zero_testkit import run_distributed

SEED_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "deepspeed_configs" / "ds_config_seed.json"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import zero_all

        h = zero_all.checkpointing.checkpoint(lambda t: torch.tanh(self.fc1(t)), x)
        return nn.functional.mse_loss(self.fc2(h).float(), y)


def _train_seed(rank: int, world_size: int, config: str, workdir: str) -> dict:
    import zero_all

    os.chdir(workdir)  # the config's tensorboard output_path is relative ("log/")
    torch.manual_seed(0)
    engine, _, _, sched = zero_all.initialize(model=Net(), config=config)
    losses = []
    for step in range(2 * engine.gradient_accumulation_steps()):
        g = torch.Generator().manual_seed(step * world_size + rank)
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 16, generator=g)
        loss = engine(x.half(), x.sum(1, keepdim=True).tanh())
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    engine.destroy()
    return {
        "micro": engine.train_micro_batch_size_per_gpu(),
        "gas": engine.gradient_accumulation_steps(),
        "steps": engine.global_steps,
        "losses": losses,
        "loss_scale": engine.loss_scale,
        "dtype": str(next(engine.module.parameters()).dtype),
        "scheduler": type(sched).__name__,
    }


def test_seed_config_trains_on_two_ranks(tmp_path: Path) -> None:
    if not SEED_CONFIG.exists():
        pytest.skip(f"{SEED_CONFIG} not present")
    results = run_distributed(_train_seed, 2, str(SEED_CONFIG), str(tmp_path), timeout=240)
    r = results[0]
    assert (r["micro"], r["gas"], r["steps"]) == (8, 4, 2)  # 64 = 8 x 4 x 2 ranks
    assert r["dtype"] == "torch.float16" and r["loss_scale"] == 2.0**16
    assert r["scheduler"] == "WarmupLR"
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    events = list((tmp_path / "log" / "seed_example").glob("events.out.tfevents.*"))
    assert events, "TensorBoard events written by rank 0"
