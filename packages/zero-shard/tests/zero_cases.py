"""Rank functions shared by the zero-shard tests: a tiny model, its data, DDP and ZeRO training loops.

Data: every step has a fixed global batch of GLOBAL_BATCH samples per micro-step; rank r of N trains on
slice r, so any world size sees the same global batch and (with equal slices) the same averaged gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zero_shard import ZeroConfig, ZeroShardedOptimizer

GLOBAL_BATCH = 8
LR, WD = 1e-2, 0.01
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TinyNet(nn.Module):
    """Two hidden layers, a LayerNorm and a tied-free head: ~1.9k parameters in 7 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.fc2(torch.tanh(self.fc1(x))))))


def make_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def batch(step: int, micro: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(GLOBAL_BATCH, 12, generator=g)
    y = torch.randn(GLOBAL_BATCH, 4, generator=g)
    n = GLOBAL_BATCH // world_size
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def full_params(model: nn.Module) -> dict[str, Any]:
    # numpy, not tensors: torch shares tensors between processes through fds that die with the rank.
    return {n: p.detach().float().numpy().copy() for n, p in model.named_parameters()}


def shard_to_np(shard: Any) -> Any:
    tensors, meta = shard
    return {k: v.numpy().copy() for k, v in tensors.items()}, meta


def shard_from_np(shard: Any) -> Any:
    tensors, meta = shard
    return {k: torch.from_numpy(v) for k, v in tensors.items()}, meta


def run_ddp(rank: int, world_size: int, steps: int, ga: int) -> dict[str, Any]:
    """Reference: torch DDP + torch.optim.AdamW in fp32, no_sync on all but the last micro-step."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(ga):
            x, y = batch(step, micro, rank, world_size)
            ctx = ddp.no_sync() if (world_size > 1 and micro < ga - 1) else _null()
            with ctx:
                loss = nn.functional.mse_loss(ddp(x), y) / ga
                loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(_global_mean(total, world_size))
    return {"losses": losses, "params": full_params(model)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _global_mean(x: float, world_size: int) -> float:
    if world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world_size


def make_zero(
    stage: int, dtype: str = "fp32", *, bucket: int = 300, overlap: bool = True, clip: float = 0.0, **kw: Any
) -> tuple[TinyNet, ZeroShardedOptimizer]:
    model = make_model()
    cfg = ZeroConfig(stage=stage, reduce_bucket_size=bucket, allgather_bucket_size=bucket, overlap_comm=overlap)
    scaler = None
    if dtype == "fp16":
        from amp_scaler import DynamicLossScaler

        scaler = DynamicLossScaler(init_scale=2.0**8, scale_window=4)
    opt = ZeroShardedOptimizer(
        list(model.named_parameters()),
        lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=WD),
        cfg,
        compute_dtype=DTYPES[dtype],
        loss_scaler=scaler,
        gradient_clipping=clip,
        **kw,
    )
    return model, opt


def train_zero(
    model: nn.Module, opt: ZeroShardedOptimizer, rank: int, world_size: int, steps: range, ga: int, dtype: str
) -> list[float]:
    losses = []
    for step in steps:
        total = 0.0
        for micro in range(ga):
            x, y = batch(step, micro, rank, world_size)
            opt.set_gradient_accumulation_boundary(micro == ga - 1)
            out = model(x.to(DTYPES[dtype])).float()
            loss = nn.functional.mse_loss(out, y) / ga
            opt.backward(loss)
            total += loss.item()
        opt.step()
        losses.append(_global_mean(total, world_size))
    return losses


def run_matrix(rank: int, world_size: int, cases: list[tuple[int, str, int]], steps: int) -> dict[Any, Any]:
    """DDP for each accumulation count, then ZeRO for each (stage, dtype, ga) case, in one process group."""
    out: dict[Any, Any] = {}
    for ga in sorted({c[2] for c in cases}):
        out[("ddp", ga)] = run_ddp(rank, world_size, steps, ga)
    for case in cases:
        # A 4th element "fp32-accum": stage 2 with grad_accum_dtype=float32 (else the compute dtype).
        stage, dtype, ga = case[:3]
        kw = {"grad_accum_dtype": torch.float32} if case[3:] == ("fp32-accum",) else {}
        model, opt = make_zero(stage, dtype, **kw)
        losses = train_zero(model, opt, rank, world_size, range(steps), ga, dtype)
        out[case] = {"losses": losses, "params": full_params(model), "skipped": opt.skipped_steps}
    return out


def run_state_bytes(rank: int, world_size: int) -> dict[Any, dict[str, int]]:
    """Per-rank bytes of master / optimizer state / gradients after one step: stages 0, 1, 2 in fp32
    (keys 0, 1, 2) and in bf16 (keys ``(stage, "bf16")``, plus ``(2, "bf16", "fp32-accum")``)."""
    out: dict[Any, dict[str, int]] = {}
    for key in (0, 1, 2, (0, "bf16"), (1, "bf16"), (2, "bf16"), (2, "bf16", "fp32-accum")):
        stage, dtype = (key, "fp32") if isinstance(key, int) else key[:2]
        kw = {"grad_accum_dtype": torch.float32} if isinstance(key, tuple) and key[2:] == ("fp32-accum",) else {}
        model, opt = make_zero(stage, dtype, **kw)
        train_zero(model, opt, rank, world_size, range(1), 1, dtype)
        out[key] = opt.state_bytes() | {"numel": sum(p.numel() for p in model.parameters())}
    return out


def run_save(rank: int, world_size: int, stage: int, steps: int) -> Any:
    """Train ``steps`` steps, return (this rank's sharded state, losses, final params)."""
    model, opt = make_zero(stage)
    losses = train_zero(model, opt, rank, world_size, range(steps), 1, "fp32")
    return shard_to_np(opt.sharded_state()), losses, full_params(model)


def run_resume(rank: int, world_size: int, stage: int, shards: list[Any], start: int, steps: int) -> Any:
    """Load ``shards`` (from any world size/stage), train steps ``start..start+steps``."""
    model, opt = make_zero(stage)
    opt.load_sharded_state([shard_from_np(s) for s in shards])
    losses = train_zero(model, opt, rank, world_size, range(start, start + steps), 1, "fp32")
    return losses, full_params(model), opt.global_steps


def run_world(rank: int, world_size: int, cases: list[tuple[int, str, int]], steps: int, resume: Any) -> dict[Any, Any]:
    """Everything one world size checks, in one process group (spawning ranks is the slow part of a test).

    ``resume``: None, or ``(shards, start, steps, stage)`` to load saved state and continue.
    Returns the training matrix, per-stage state bytes, and (world size 2) a save/resume round trip.
    """
    out = run_matrix(rank, world_size, cases, steps)
    out["bytes"] = run_state_bytes(rank, world_size)
    if resume is not None:
        shards, start, n, stage = resume
        out["resumed"] = run_resume(rank, world_size, stage, shards, start, n)
    if world_size == 2:
        # Uninterrupted stage-2 run of 6 steps, its state after 3, and a same-size resume from it.
        model, opt = make_zero(2)
        first = train_zero(model, opt, rank, world_size, range(3), 1, "fp32")
        shard = shard_to_np(opt.sharded_state())
        rest = train_zero(model, opt, rank, world_size, range(3, 6), 1, "fp32")
        out["straight"] = (first + rest, full_params(model))
        out["shard"] = shard
        gathered = [None] * world_size
        dist.all_gather_object(gathered, shard)
        out["same_size_resume"] = run_resume(rank, world_size, 2, gathered, 3, 3)
        # Every collective choice and overlap_comm=false must give the same numbers as the defaults.
        from zero_shard import CollectiveChoice

        variants = {
            "reduce+all_gather": dict(collectives=CollectiveChoice("reduce", "all_gather")),
            "all_reduce+all_reduce": dict(collectives=CollectiveChoice("all_reduce", "all_reduce")),
            "no_overlap": dict(overlap=False),
            "one_bucket": dict(bucket=10**6),
        }
        for name, kw in variants.items():
            for stage in (1, 2):
                model, opt = make_zero(stage, **kw)
                losses = train_zero(model, opt, rank, world_size, range(steps), 1, "fp32")
                out[("variant", name, stage)] = {"losses": losses, "params": full_params(model)}
    return out
