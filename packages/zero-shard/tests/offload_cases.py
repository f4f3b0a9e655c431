"""Rank functions for the offload tests: the stage-3 tests' tiny GPT trained with offload none / cpu / nvme.

Every case uses ds-native's CPU Adam (what offload steps with); the reference is the same stage without
offload, so the comparison isolates what offload changes. Data as in zero3_cases.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import zero3_cases as z3
from torch import nn

from zero_shard import ZeroConfig, ZeroShardedOptimizer, default_optimizer_factory

LR, WD, CLIP = 1e-2, 0.01, 0.5


def offload_section(kind: str, nvme_dir: str, rank: int) -> dict[str, Any] | None:
    if kind == "none":
        return None
    if kind == "cpu":
        return {"device": "cpu", "pin_memory": True}
    # One directory for both ranks: each rank's run directory is its own.
    return {"device": "nvme", "nvme_path": nvme_dir, "buffer_count": 9}


def param_section(kind: str, nvme_dir: str) -> dict[str, Any] | None:
    # "nvme+param": stage-3 parameter shards in swap files too, none kept in CPU memory.
    return {"device": "nvme", "nvme_path": nvme_dir, "max_in_cpu": 0} if kind == "nvme+param" else None


def build(stage: int, dtype: str, kind: str, nvme_dir: str, rank: int, **zero: Any) -> tuple[nn.Module, Any]:
    model = z3.make_model()
    off = offload_section(kind.removesuffix("+param"), nvme_dir, rank)
    cfg = {"stage": stage, "reduce_bucket_size": 500, "allgather_bucket_size": 500, **zero}
    if off is not None:
        cfg["offload_optimizer"] = off
    if param_section(kind, nvme_dir) is not None:
        cfg["offload_param"] = param_section(kind, nvme_dir)
    if stage == 3:
        cfg.setdefault("stage3_param_persistence_threshold", 20)
    opt = ZeroShardedOptimizer(
        list(model.named_parameters()),
        default_optimizer_factory(lr=LR, weight_decay=WD),
        ZeroConfig.model_validate(cfg),
        compute_dtype=z3.DTYPES[dtype],
        gradient_clipping=CLIP,
        module=model if stage == 3 else None,
        loss_scaler=z3._scaler(dtype),
    )
    return model, opt


def train(model: nn.Module, opt: Any, rank: int, world_size: int, steps: range, ga: int) -> list[float]:
    losses = []
    for step in steps:
        total = 0.0
        for micro in range(ga):
            opt.set_gradient_accumulation_boundary(micro == ga - 1)
            loss = z3.lm_loss(model, z3.batch(step, micro, rank, world_size)) / ga
            opt.backward(loss)
            total += loss.item()
        opt.step()
        t = torch.tensor([total])
        dist.all_reduce(t)
        losses.append(t.item() / world_size)
    return losses


def params(model: nn.Module, opt: Any) -> dict[str, Any]:
    from zero_shard import GatheredParameters

    if opt.stage == 3:
        with GatheredParameters(list(model.parameters())):
            return z3.params_np(model)
    return z3.params_np(model)


def run_matrix(rank: int, world_size: int, nvme_dir: str, cases: list[tuple], steps: int) -> dict[Any, Any]:
    """Each (stage, dtype, ga, kind) case: losses, final parameters, pieces stepped, state bytes."""
    out: dict[Any, Any] = {}
    for stage, dtype, ga, kind in cases:
        sub = {"sub_group_size": 700} if kind.startswith("nvme") else {}
        model, opt = build(stage, dtype, kind, nvme_dir, rank, **sub)
        losses = train(model, opt, rank, world_size, range(steps), ga)
        out[(stage, dtype, ga, kind)] = {
            "losses": losses,
            "params": params(model, opt),
            "skipped": opt.skipped_steps,
            "pieces": opt.last_step_sub_groups,
            "bytes": opt.state_bytes(),
        }
        if kind == "nvme+param":
            store = opt.param_store
            out[(stage, dtype, ga, kind)]["param_units"] = sum(1 for u in opt.units if u.store is not None)
            out[(stage, dtype, ga, kind)]["param_read"] = store.bytes_read
        if kind.startswith("nvme"):
            run_dir = opt.offload.nvme.scratch.path
            out[(stage, dtype, ga, kind)]["swap_files"] = len(list(run_dir.glob("*.swp")))
            opt.offload.close()
            out[(stage, dtype, ga, kind)]["removed"] = not run_dir.exists()
    return out


def run_all(rank: int, world_size: int, nvme_dir: str, cases: list[tuple], steps: int) -> dict[Any, Any]:
    """The matrix and the checkpoint round trips in one process group (spawning ranks is the slow part)."""
    out = run_matrix(rank, world_size, nvme_dir, cases, steps)
    out["checkpoint"] = {
        2: run_checkpoint(rank, world_size, nvme_dir, 2, (("nvme", "none"), ("none", "nvme")), state_dict=True),
        3: run_checkpoint(rank, world_size, nvme_dir, 3, (("nvme", "none"), ("cpu", "nvme")), state_dict=False),
    }
    return out


def _np(shard: Any) -> Any:
    tensors, meta = shard
    return {k: v.numpy().copy() for k, v in tensors.items()}, meta


def _torch(shard: Any) -> Any:
    tensors, meta = shard
    return {k: torch.from_numpy(v) for k, v in tensors.items()}, meta


def run_checkpoint(
    rank: int, world_size: int, nvme_dir: str, stage: int, pairs: tuple, state_dict: bool
) -> dict[Any, Any]:
    """Save with one offload kind after 2 steps, resume with another for 2 more (``pairs``: (saver, loader))."""
    out: dict[Any, Any] = {}
    model, opt = build(stage, "fp32", "none", nvme_dir, rank)
    out["straight"] = train(model, opt, rank, world_size, range(4), 1)
    for saver, loader in pairs:
        model, opt = build(stage, "fp32", saver, nvme_dir, rank, sub_group_size=700)
        first = train(model, opt, rank, world_size, range(2), 1)
        shard = _np(opt.sharded_state())
        shards: list[Any] = [None] * world_size
        dist.all_gather_object(shards, shard)
        model, opt = build(stage, "fp32", loader, nvme_dir, rank, sub_group_size=700)
        opt.load_sharded_state([_torch(s) for s in shards])
        out[(saver, loader)] = first + train(model, opt, rank, world_size, range(2, 4), 1)
    if not state_dict:
        return out
    # torch-style state_dict round trip under NVMe offload (the whole rank state comes into memory).
    model, opt = build(stage, "fp32", "nvme", nvme_dir, rank, sub_group_size=700)
    train(model, opt, rank, world_size, range(2), 1)
    sd = opt.state_dict()
    model2, opt2 = build(stage, "fp32", "nvme", nvme_dir, rank, sub_group_size=700)
    opt2.load_state_dict(sd)
    out["state_dict"] = train(model2, opt2, rank, world_size, range(2, 4), 1)
    return out
