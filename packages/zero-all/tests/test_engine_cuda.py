"""The engine on CUDA: one GPU (NCCL group of one, built by initialize() itself) against plain torch, bf16/fp16,
a checkpoint round trip with the CUDA RNG state, and NCCL across two GPUs. Plus DS_ACCELERATOR's device choice
(on every machine).

The cuda cases are collected everywhere and skip with the reason without a device (``pytest -m cuda``).
Each runs in a fresh process (``run_distributed``) so that initialize()'s process group and CUDA state
never leak into other tests. Rank functions return numpy arrays and floats, never tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import zero_all
from zero_all.distributed import get_device
from zero_all.optim import optimizer_factory
from zero_testkit import cuda_only, cuda_skip_reason, ds_native_cuda_skip_reason, requires_gpus, run_distributed

LR, CLIP, GAS, MICRO = 1e-2, 0.5, 2, 8  # MICRO: the global batch of one micro step
CUDA_ENV = {"DS_ACCELERATOR": "cuda"}


class Net(nn.Module):
    """An MLP with a LayerNorm and dropout (dropout makes a resumed run depend on the CUDA RNG state)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.norm, self.drop, self.fc2 = (
            nn.Linear(16, 64),
            nn.LayerNorm(64),
            nn.Dropout(dropout),
            nn.Linear(64, 4),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.drop(self.norm(torch.tanh(self.fc1(x)))))
        return nn.functional.mse_loss(out.float(), y.float())


def _model(dropout: float = 0.0) -> Net:
    torch.manual_seed(0)
    return Net(dropout)


def _batch(step: int, micro: int, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(MICRO, 16, generator=g)
    y = torch.tanh(x[:, :4] - x[:, 4:8])
    n = MICRO // world
    return x[rank * n : (rank + 1) * n].to(device), y[rank * n : (rank + 1) * n].to(device)


def _config(world: int, stage: int, **over: Any) -> dict[str, Any]:
    cfg = {
        "train_batch_size": MICRO * GAS,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.99], "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 500},
    }
    return cfg | over


def _dev(rank: int) -> torch.device:
    """This rank's device: as the engine picks it (``DS_ACCELERATOR=cuda`` in these tests' ranks)."""
    if os.environ.get("DS_ACCELERATOR") == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _train(engine: Any, rank: int, world: int, start: int, stop: int, dtype: torch.dtype) -> list[float]:
    """Steps [start, stop); returns each step's loss averaged over micro steps and ranks."""
    losses = []
    for step in range(start, stop):
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
        for m in range(GAS):
            x, y = _batch(step, m, rank, world, engine.device)
            loss = engine(x.to(dtype), y)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double() / GAS
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _params(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}


def _plain(steps: int, device: torch.device) -> tuple[list[float], dict[str, np.ndarray]]:
    """The reference on one device: torch AdamW, clip_grad_norm_, the global batch of every micro step."""
    model = _model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    losses = []
    for step in range(steps):
        total = 0.0
        for m in range(GAS):
            loss = model(*_batch(step, m, 0, 1, device))
            (loss / GAS).backward()
            total += float(loss.detach()) / GAS
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, _params(model)


# ---- rank functions (each runs in its own process) -----------------------------------------------------


def _fp32_stages(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"ref": _plain(6, _dev(rank))}
    for stage in (0, 1, 2):
        engine, *_ = zero_all.initialize(model=_model(), config=_config(world, stage))
        losses = _train(engine, rank, world, 0, 6, torch.float32)
        out[stage] = (losses, _params(engine.module))
        out["optimizer"] = type(engine.optimizer.inner).__name__
        out["device"] = str(engine.device)
        out["backend"] = str(torch.distributed.get_backend())
    return out


def _low_precision(rank: int, world: int) -> dict[str, Any]:
    engine, *_ = zero_all.initialize(model=_model(), config=_config(world, 2, bf16={"enabled": True}))
    bf16 = _train(engine, rank, world, 0, 6, torch.bfloat16)
    bf16_dtype = str(next(engine.module.parameters()).dtype)
    # fp16 with a first scale of 2**24: the fp16 gradients overflow until the scale comes down.
    fp16_cfg = {"enabled": True, "initial_scale_power": 24, "hysteresis": 1, "loss_scale_window": 100}
    engine, *_ = zero_all.initialize(model=_model(), config=_config(world, 1, fp16=fp16_cfg))
    skipped = []
    for step in range(12):
        _train(engine, rank, world, step, step + 1, torch.float16)
        skipped.append(engine.was_step_skipped())
    return {
        "ref": _plain(6, _dev(rank))[0],
        "bf16": bf16,
        "bf16_dtype": bf16_dtype,
        "fp16_skipped": skipped,
        "fp16_scale": engine.loss_scale,
        "fp16_skips": engine.skipped_steps,
    }


def _checkpoint_round_trip(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    cfg = _config(world, 2, bf16={"enabled": True})
    engine, *_ = zero_all.initialize(model=_model(dropout=0.2), config=cfg)
    _train(engine, rank, world, 0, 3, torch.bfloat16)
    engine.save_checkpoint(ckpt)
    rest = _train(engine, rank, world, 3, 6, torch.bfloat16)
    final = _params(engine.module)
    torch.manual_seed(99)
    engine2, *_ = zero_all.initialize(model=Net(dropout=0.2), config=cfg)
    engine2.load_checkpoint(ckpt)
    resumed = _train(engine2, rank, world, 3, 6, torch.bfloat16)
    return {"rest": rest, "resumed": resumed, "final": final, "resumed_params": _params(engine2.module)}


# ---- tests ---------------------------------------------------------------------------------------------------


def test_get_device_follows_ds_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "xpu9")
    with pytest.raises(ValueError, match="DS_ACCELERATOR='xpu9' is not supported; accepted: 'cpu', 'cuda'"):
        get_device()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    if cuda_skip_reason() is None:
        assert get_device().type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda, but torch"):
            get_device()
    monkeypatch.delenv("DS_ACCELERATOR")
    assert get_device().type == ("cuda" if cuda_skip_reason() is None else "cpu")


def test_adam_on_cuda_is_ds_natives_fused_kernel_unless_torch_adam() -> None:
    import ds_native

    p = [{"params": [nn.Parameter(torch.zeros(3))]}]
    cuda = torch.device("cuda")
    opt = optimizer_factory("Adam", {"lr": 1e-3}, cuda)(p)
    # DeepSpeed: FusedAdam on GPUs; torch's AdamW when ds-native has no CUDA kernels or torch_adam is set.
    assert type(opt).__name__ == ("FusedAdam" if ds_native.build_info()["cuda"] else "AdamW")
    assert opt.defaults["weight_decay"] == 0.0
    assert type(optimizer_factory("AdamW", {"torch_adam": True}, cuda)(p)) is torch.optim.AdamW
    assert type(optimizer_factory("Adam", {"adam_w_mode": False, "torch_adam": True}, cuda)(p)) is torch.optim.Adam


@cuda_only
def test_one_gpu_fp32_stages_match_plain_torch() -> None:
    (r,) = run_distributed(_fp32_stages, 1, init_process_group=False, env=CUDA_ENV, timeout=240)
    assert r["device"] == "cuda:0" and r["backend"] == "nccl"  # initialize() built the group itself
    assert r["optimizer"] == ("FusedAdam" if ds_native_cuda_skip_reason() is None else "AdamW")
    ref_losses, ref_params = r["ref"]
    for stage in (0, 1, 2):
        losses, params = r[stage]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"stage {stage}")
        for k, v in ref_params.items():
            np.testing.assert_allclose(params[k], v, rtol=1e-5, atol=1e-6, err_msg=f"stage {stage} {k}")
    assert ref_losses[-1] < ref_losses[0]


@cuda_only
def test_one_gpu_bf16_tracks_fp32_and_fp16_overflow_skips() -> None:
    (r,) = run_distributed(_low_precision, 1, init_process_group=False, env=CUDA_ENV, timeout=240)
    assert r["bf16_dtype"] == "torch.bfloat16"
    np.testing.assert_allclose(r["bf16"], r["ref"], rtol=2e-2)
    # 2**24 overflows at once; each overflow halves the scale (hysteresis 1), then steps go through.
    assert r["fp16_skipped"][0] and not r["fp16_skipped"][-1]
    assert r["fp16_skips"] == sum(r["fp16_skipped"]) and r["fp16_scale"] == 2.0 ** (24 - r["fp16_skips"])


@cuda_only
def test_one_gpu_checkpoint_resume_is_bit_identical(tmp_path: Path) -> None:
    (r,) = run_distributed(
        _checkpoint_round_trip, 1, str(tmp_path), init_process_group=False, env=CUDA_ENV, timeout=240
    )
    # Same weights, optimizer state, loss scale and CUDA RNG (dropout masks): the same numbers.
    assert r["resumed"] == r["rest"]
    for k, v in r["final"].items():
        assert np.array_equal(r["resumed_params"][k], v), k


@requires_gpus(2)
@pytest.mark.multi_gpu
def test_two_gpus_over_nccl_match_plain_torch() -> None:
    results = run_distributed(_fp32_stages, 2, init_process_group=False, env=CUDA_ENV, timeout=300)
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    for r in results:
        assert r["backend"] == "nccl"
        ref_losses, ref_params = r["ref"]
        for stage in (0, 1, 2):
            losses, params = r[stage]
            np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"stage {stage}")
            for k, v in ref_params.items():
                np.testing.assert_allclose(params[k], v, rtol=1e-5, atol=1e-6, err_msg=f"stage {stage} {k}")
