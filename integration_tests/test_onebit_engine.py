"""OneBitAdam / ZeroOneAdam / OneBitLamb through initialize() on 2 gloo ranks: the engine skips its
gradient all-reduce when they communicate themselves, a checkpoint saved in the compression phase
resumes bit for bit, and loading it at another world size is a clear error.

Each case trains 12 optimizer steps (warm-up ends after step 4), saves at step 7, trains on; a second
engine loads step 7 and trains the same 5 steps: the parameters must be identical (exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from onebit_comm import compressed_bytes
from zero_testkit import DistributedTestError, run_distributed

STEPS, SAVE_AT, FREEZE = 12, 7, 4
CASES = {
    "onebit_adam_fp32_gas2": ("OneBitAdam", {"lr": 2e-3, "freeze_step": FREEZE}, "fp32", 2),
    # var_update_scaler 2: variance updates at steps 1, 2, 4; local steps from step 5 with the
    # interval growing 1 -> 2 -> 4, so step 7 (the save) falls between two synchronisations.
    "zero_one_adam_bf16": (
        "ZeroOneAdam",
        {
            "lr": 2e-3,
            "var_freeze_step": FREEZE,
            "var_update_scaler": 2,
            "local_step_scaler": 2,
            "local_step_clipper": 4,
        },
        "bf16",
        1,
    ),
    "onebit_lamb_fp16": ("OneBitLamb", {"lr": 1e-2, "freeze_step": FREEZE, "weight_decay": 0.01}, "fp16", 1),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)  # 577 parameters in all: not a multiple of 8 x world size
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.fc2(torch.tanh(self.fc1(x))).float(), y)


def _config(opt: str, params: dict[str, Any], dtype: str, gas: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "optimizer": {"type": opt, "params": {**params, "comm_backend_name": "nccl", "cuda_aware": False}},
        "zero_optimization": {"stage": 0},
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def _train(engine: Any, rank: int, lo: int, hi: int, dtype: torch.dtype) -> list[float]:
    losses = []
    for step in range(lo, hi):
        for micro in range(engine.gradient_accumulation_steps()):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
            x = torch.randn(4, 16, generator=g)
            loss = engine(x.to(dtype), x[:, :1].sin())
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    return losses


def _flat(engine: Any) -> np.ndarray:
    return torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()]).numpy()


def _run_case(rank: int, world: int, name: str, ckpt: str) -> dict[str, Any]:
    import zero_all

    opt, params, dtype_name, gas = CASES[name]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(0)
    engine, *_ = zero_all.initialize(model=Net(), config=_config(opt, params, dtype_name, gas))
    numel = sum(p.numel() for p in engine.module.parameters())

    # Count the engine's gradient all-reduces (the only all-reduces as large as the model).
    big: list[int] = []
    real_all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
        if tensor.numel() >= numel:
            big.append(engine.global_steps + 1)
        return real_all_reduce(tensor, *a, **k)

    dist.all_reduce = counting
    try:
        losses = _train(engine, rank, 0, SAVE_AT, dtype)
        engine.save_checkpoint(ckpt, tag="mid")
        losses += _train(engine, rank, SAVE_AT, STEPS, dtype)
    finally:
        dist.all_reduce = real_all_reduce
    inner = engine.optimizer.inner
    first = {"params": _flat(engine), "losses": losses, "bytes": inner.stats.bytes_sent, "big": big, "numel": numel}

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    engine2, *_ = zero_all.initialize(model=Net(), config=_config(opt, params, dtype_name, gas))
    engine2.load_checkpoint(ckpt, tag="mid")
    assert engine2.global_steps == SAVE_AT
    _train(engine2, rank, SAVE_AT, STEPS, dtype)
    first["resumed"] = _flat(engine2)
    return first


def _load_elsewhere(rank: int, world: int, name: str, ckpt: str) -> None:
    import zero_all

    opt, params, dtype_name, gas = CASES[name]
    engine, *_ = zero_all.initialize(model=Net(), config=_config(opt, params, dtype_name, gas))
    engine.load_checkpoint(ckpt, tag="mid")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[dict[str, Any]], Path]]:
    out = {}
    for name in CASES:
        ckpt = tmp_path_factory.mktemp(name)
        out[name] = (run_distributed(_run_case, 2, name, str(ckpt), timeout=240), ckpt)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_resume_in_compression_phase_is_exact(runs: dict[str, Any], name: str) -> None:
    results, _ = runs[name]
    for r, res in enumerate(results):
        np.testing.assert_array_equal(res["resumed"], res["params"], err_msg=f"rank {r}")
        assert all(np.isfinite(res["losses"]))


@pytest.mark.parametrize("name", list(CASES))
def test_engine_all_reduces_only_when_the_optimizer_asks(runs: dict[str, Any], name: str) -> None:
    results, _ = runs[name]
    res = results[0]
    n, w = res["numel"], 2
    per_call = compressed_bytes(n, w)
    if name.startswith("zero_one"):
        # Variance updates (full all-reduce) at steps 1, 2, 4; step 3 compresses the gradient; local
        # steps 5..12 synchronise at 5, 6 (interval 1), 8 (interval 2), 12 (interval 4).
        assert res["big"] == [1, 2, 4]
        assert res["bytes"] == per_call * (1 + 4)
    else:
        assert res["big"] == [1, 2, 3, 4]  # warm-up only
        assert res["bytes"] == per_call * (STEPS - FREEZE)
    # every rank ends with the same parameters once synchronised (0/1 Adam synchronised at step 12)
    np.testing.assert_array_equal(results[0]["params"], results[1]["params"])


def test_loading_at_another_world_size_is_a_clear_error(runs: dict[str, Any]) -> None:
    _, ckpt = runs["onebit_adam_fp32_gas2"]
    with pytest.raises(DistributedTestError, match="cannot be resharded"):
        run_distributed(_load_elsewhere, 1, "onebit_adam_fp32_gas2", str(ckpt), timeout=120)
