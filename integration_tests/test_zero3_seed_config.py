"""The seed tutorials' ZeRO-3 config (``"auto"`` everywhere, CPU offload of optimizer and parameters) loads
as it is and trains through initialize() on 2 gloo ranks, with activation checkpointing inside a block."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zero_testkit import run_distributed

ZERO3_AUTO = Path(__file__).resolve().parents[1] / "examples" / "deepspeed_configs" / "ds_config_zero3_auto.json"
HIDDEN = 32


class Net(nn.Module):
    """A two-layer MLP with a Hugging Face-style ``config.hidden_size`` for the ``"auto"`` bucket sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.fc2 = nn.Linear(4 * HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import zero_all

        h = zero_all.checkpointing.checkpoint(lambda t: self.fc2(torch.tanh(self.fc1(t))), x)
        return nn.functional.mse_loss(self.out(h), y)


def _train(rank: int, world_size: int, config: str) -> dict:
    import zero_all

    torch.manual_seed(0)
    x = torch.randn(64, HIDDEN)
    data = TensorDataset(x, x.sum(1, keepdim=True).tanh())
    engine, _, loader, _ = zero_all.initialize(
        model=Net(), config=config, training_data=DataLoader(data, batch_size=4), optimizer=torch.optim.AdamW
    )
    losses = []
    for _ in range(3):
        for xb, yb in loader:
            loss = engine(xb, yb)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    zero = engine.config.zero_optimization
    return {
        "stage": engine.zero_optimization_stage(),
        "losses": losses,
        "prefetch": zero.prefetch_bucket_size,
        "persist": zero.param_persistence_threshold,
        "released": engine.module.fc1.weight.untyped_storage().nbytes() == 0,
    }


def test_zero3_auto_config_trains_on_two_ranks() -> None:
    r = run_distributed(_train, 2, str(ZERO3_AUTO), timeout=240)[0]
    assert r["stage"] == 3
    assert (r["prefetch"], r["persist"]) == (int(0.9 * HIDDEN * HIDDEN), 10 * HIDDEN)  # "auto" from hidden_size
    assert r["losses"][-1] < r["losses"][0]
    assert r["released"]
