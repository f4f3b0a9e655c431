"""ZeRO stages 0/1/2/3 on each device: one process on cpu and cuda against plain torch AdamW, two ranks with CUDA
tensors over gloo (one GPU is enough), and NCCL across two GPUs.

The cuda cases are collected everywhere and skip with the reason without a device (``pytest -m cuda``).
Tolerances as in test_zero_training.py: fp32 1e-5 relative; 16-bit runs of different stages agree exactly.
Rank functions return numpy arrays (tensors cross processes through file descriptors that die with the rank).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from amp_scaler import DynamicLossScaler
from zero_shard import GatheredParameters, ZeroConfig, ZeroShardedOptimizer, default_optimizer_factory
from zero_testkit import cuda_only, requires_gpus, run_distributed

LR, WD, STEPS, BATCH = 1e-2, 0.01, 4, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model(device: torch.device | str) -> nn.Module:
    torch.manual_seed(0)
    # Uneven tensor sizes: partitions split tensors, buckets hold several.
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.LayerNorm(40), nn.Linear(40, 8)).to(device)


def _batch(step: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 24, generator=g).to(device), torch.randn(BATCH, 8, generator=g).to(device)


def _plain(device: str, clip: float) -> dict[str, np.ndarray]:
    """The reference: the same model and data, torch.optim.AdamW, torch's clip_grad_norm_."""
    model = _model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for step in range(STEPS):
        x, y = _batch(step, device)
        nn.functional.mse_loss(model(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}


def _zero(
    device: str, stage: int, dtype: str = "fp32", *, clip: float = 0.0, rank: int = 0, world: int = 1, **cfg: Any
) -> tuple[dict[str, np.ndarray], ZeroShardedOptimizer]:
    """ZeRO training; rank ``rank`` of ``world`` takes its slice of every global batch."""
    model = _model(device)
    scaler = DynamicLossScaler(init_scale=2.0**8, scale_window=4) if dtype == "fp16" else None
    opt = ZeroShardedOptimizer(
        list(model.named_parameters()),
        lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=WD),
        ZeroConfig(stage=stage, reduce_bucket_size=300, allgather_bucket_size=300, **cfg),
        compute_dtype=DTYPES[dtype],
        loss_scaler=scaler,
        gradient_clipping=clip,
        module=model if stage == 3 else None,
    )
    n = BATCH // world
    for step in range(STEPS):
        x, y = _batch(step, device)
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        opt.backward(nn.functional.mse_loss(model(x.to(DTYPES[dtype])).float(), y))
        opt.step()
    with GatheredParameters(list(model.parameters())):  # stage 3: gathered to read; a no-op below
        return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}, opt


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize(
    ("stage", "overlap"),
    [(0, False), (1, True), (2, False), (2, True), (3, True)],
    ids=["0", "1-overlap", "2", "2-overlap", "3"],
)
def test_one_rank_matches_torch_adamw(device: torch.device, stage: int, overlap: bool) -> None:
    ref = _plain(device.type, clip=0.5)
    got, opt = _zero(device.type, stage, clip=0.5, overlap_comm=overlap)
    assert all(m.device.type == device.type for m in opt.masters)
    init = {n: p.detach().cpu().numpy() for n, p in _model("cpu").named_parameters()}
    for k, v in ref.items():
        assert _rel(got[k], v) <= 1e-5, k
        assert np.abs(got[k] - init[k]).max() > 0.5 * LR, f"{k} did not move"


@cuda_only
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16bit_stages_agree_exactly_on_cuda(dtype: str) -> None:
    runs = {stage: _zero("cuda", stage, dtype, clip=1.0) for stage in (0, 1, 2)}
    ref = _plain("cuda", clip=1.0)
    for stage, (params, opt) in runs.items():
        assert opt.flat_params[0].dtype == DTYPES[dtype] and opt.masters[0].dtype == torch.float32
        assert opt.skipped_steps == 0, stage
        for k, v in params.items():
            assert np.array_equal(v, runs[0][0][k]), (stage, k)
            assert np.abs(v - ref[k]).max() <= 2 * LR * STEPS, (stage, k)  # tracks fp32 (see the docstring)


@cuda_only
def test_fp16_overflow_on_cuda_skips_and_recovers() -> None:
    model = _model("cuda")
    scaler = DynamicLossScaler(init_scale=2.0**30, hysteresis=1, scale_window=100)
    opt = ZeroShardedOptimizer(
        list(model.named_parameters()),
        lambda groups: torch.optim.AdamW(groups, lr=LR),
        ZeroConfig(stage=2),
        compute_dtype=torch.float16,
        loss_scaler=scaler,
    )
    before = [p.detach().clone() for p in model.parameters()]
    took = []
    for step in range(30):
        x, y = _batch(step, "cuda")
        opt.backward(nn.functional.mse_loss(model(x.half()).float(), y))
        took.append(opt.step())
    # 2**30 overflows fp16 at once: the first steps are skipped (params untouched) until the scale fits.
    assert took[0] is False and opt.skipped_steps >= 1 and took[-1] is True
    assert opt.loss_scale < 2.0**30
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@cuda_only
def test_default_factory_keeps_cuda_partitions_on_cuda() -> None:
    model = _model("cuda")
    opt = ZeroShardedOptimizer(list(model.named_parameters()), default_optimizer_factory(lr=LR), ZeroConfig(stage=1))
    assert isinstance(opt.inner, torch.optim.AdamW)
    x, y = _batch(0, "cuda")
    opt.backward(nn.functional.mse_loss(model(x), y))
    opt.step()
    state = opt.inner.state[opt.masters[0]]
    assert state["exp_avg"].device.type == "cuda"


def _ranks(rank: int, world_size: int, stage: int, cfg: dict[str, Any]) -> dict[str, Any]:
    device = f"cuda:{rank % torch.cuda.device_count()}"
    params, opt = _zero(device, stage, clip=0.5, rank=rank, world=world_size, **cfg)
    return {"params": params, "backend": str(dist.get_backend()), "collectives": repr(opt.collectives)}


def _check_against_one_process(results: list[dict[str, Any]]) -> None:
    ref = _plain("cuda", clip=0.5)
    for r in results:
        for k, v in ref.items():
            assert _rel(r["params"][k], v) <= 1e-5, k
    for k in ref:
        assert np.array_equal(results[0]["params"][k], results[1]["params"][k]), k  # every rank: same model


@cuda_only
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_with_cuda_tensors_over_gloo(stage: int) -> None:
    # gloo moves CUDA tensors for all_reduce and broadcast, the collectives zero-shard picks for it.
    results = run_distributed(_ranks, 2, stage, {"overlap_comm": True}, timeout=180)
    assert results[0]["backend"] == "gloo"
    _check_against_one_process(results)


@requires_gpus(2)
@pytest.mark.multi_gpu
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_two_gpus_over_nccl(stage: int, overlap: bool) -> None:
    # NCCL: reduce to the owner + all-gather (the textbook collectives) for stages 1-2.
    results = run_distributed(_ranks, 2, stage, {"overlap_comm": overlap}, backend="nccl", timeout=180)
    assert results[0]["backend"] == "nccl"
    if stage in (1, 2):
        assert "grad='reduce'" in results[0]["collectives"] and "param='all_gather'" in results[0]["collectives"]
    _check_against_one_process(results)
