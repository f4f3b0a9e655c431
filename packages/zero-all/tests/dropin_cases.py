"""Rank functions for the drop-in API tests (zero_all.comm, init_distributed, the ZeRO optimizer's state).

Results are plain Python / numpy values (tensors do not survive the rank's exit).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import zero_all
from zero_all import comm


def comm_collectives(rank: int, world_size: int) -> dict[str, Any]:
    """Every zero_all.comm collective against the value it must produce, on gloo."""
    out: dict[str, Any] = {"rank": comm.get_rank(), "world": comm.get_world_size(), "local": comm.get_local_rank()}
    x = torch.tensor([1.0 + rank, 10.0 * (rank + 1)])
    t = x.clone()
    comm.all_reduce(t)
    out["sum"] = t.tolist()
    t = x.clone()
    comm.all_reduce(t, op=comm.ReduceOp.AVG)  # gloo has no AVG: emulated
    out["avg"] = t.tolist()
    t = x.clone()
    comm.all_reduce(t, op=comm.ReduceOp.MAX, prof=True, log_name="x", debug="y")  # DeepSpeed's logger kwargs
    out["max"] = t.tolist()
    t = x.clone()
    work = comm.all_reduce(t, op=comm.ReduceOp.AVG, async_op=True)
    work.wait()
    out["avg_async"] = t.tolist()
    t = x.clone()
    out["inference_is_same"] = comm.inference_all_reduce(t) is t
    out["inference"] = t.tolist()
    a, b = x.clone(), x[:1].clone() * 3
    comm.all_reduce_coalesced([a, b])
    out["coalesced"] = [a.tolist(), b.tolist()]
    gathered = [torch.zeros(2) for _ in range(world_size)]
    comm.all_gather(gathered, x)
    out["all_gather"] = [g.tolist() for g in gathered]
    flat = torch.zeros(2 * world_size)
    comm.all_gather_into_tensor(flat, x)
    out["all_gather_into_tensor"] = flat.tolist()
    flat2 = torch.zeros(2 * world_size)
    comm.allgather_fn(flat2, x)
    out["allgather_fn"] = flat2.tolist()
    big = torch.arange(2.0 * world_size) + 100 * rank
    mine = torch.zeros(2)
    comm.reduce_scatter_tensor(mine, big)
    out["reduce_scatter_tensor"] = mine.tolist()
    mine = torch.zeros(2)
    comm.reduce_scatter_tensor(mine, big, op=comm.ReduceOp.AVG)
    out["reduce_scatter_avg"] = mine.tolist()
    mine = torch.zeros(2)
    comm.reduce_scatter(mine, [big[2 * i : 2 * i + 2].clone() for i in range(world_size)])
    out["reduce_scatter"] = mine.tolist()
    t = x.clone()
    comm.broadcast(t, src=1)
    out["broadcast"] = t.tolist()
    t = x.clone()
    comm.reduce(t, dst=0)
    out["reduce_on_dst"] = t.tolist() if rank == 0 else None
    objs = [None] * world_size
    comm.all_gather_object(objs, {"r": rank})
    out["objects"] = objs
    if rank == 0:
        comm.send(torch.tensor([42.0]), dst=1)
    elif rank == 1:
        got = torch.zeros(1)
        comm.recv(got, src=0)
        out["recv"] = got.tolist()
    group = comm.new_group([1])
    out["group_ranks"] = comm.get_all_ranks_from_group(group) if rank == 1 else None
    out["global_of_group_rank0"] = comm.get_global_rank(group, 0) if rank == 1 else None
    out["world_ranks"] = comm.get_all_ranks_from_group()
    comm.barrier()
    # More checks that need two ranks, in the same processes (each spawn costs seconds on a loaded machine).
    out["allreduce_op"] = {op: allreduce_op_sum(rank, world_size, op)["delta"] for op in ("mean", "SUM")}
    out["state_dict_max_diff"] = optimizer_state_dict_round_trip(rank, world_size)["max_diff"]
    return out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum()


def allreduce_op_sum(rank: int, world_size: int, op: str) -> dict[str, Any]:
    """One SGD(lr=1) step under ``gradient_allreduce_op``: the update is minus the sum (or mean) of rank gradients."""
    torch.manual_seed(0)
    model = _Net()
    before = model.fc.weight.detach().clone()
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_allreduce_op": op,
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
        "zero_optimization": {"stage": 1},
    }
    engine, *_ = zero_all.initialize(model=model, config=cfg)
    x = torch.full((1, 3), float(rank + 1))
    engine.backward(engine(x))
    engine.step()
    # d(sum(Wx + b))/dW = ones(2, 1) @ x: rank r contributes (r + 1) everywhere.
    delta = (before - model.fc.weight.detach()).numpy()
    return {"delta": delta.tolist()}


def optimizer_state_dict_round_trip(rank: int, world_size: int) -> dict[str, Any]:
    """Stage 2, two ranks: state_dict() after 3 steps, 2 more steps; a fresh engine loads it and repeats them."""

    def make() -> Any:
        torch.manual_seed(0)
        cfg = {
            "train_micro_batch_size_per_gpu": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.05}},
            "zero_optimization": {"stage": 2},
        }
        return zero_all.initialize(model=nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)), config=cfg)

    def steps(engine: Any, lo: int, hi: int) -> None:
        for s in range(lo, hi):
            g = torch.Generator().manual_seed(10 * s + rank)
            x = torch.randn(2, 5, generator=g)
            engine.backward(engine(x).pow(2).mean())
            engine.step()

    engine, opt, *_ = make()
    assert isinstance(opt, torch.optim.Optimizer)
    steps(engine, 0, 3)
    sd = opt.state_dict()
    steps(engine, 3, 5)
    first = [p.detach().numpy().copy() for p in engine.module.parameters()]
    engine2, opt2, *_ = make()
    opt2.load_state_dict(sd)
    steps(engine2, 3, 5)
    second = [p.detach().numpy().copy() for p in engine2.module.parameters()]
    return {"max_diff": max(float(np.abs(a - b).max()) for a, b in zip(first, second, strict=True))}


def init_from_env(rank: int, world_size: int) -> dict[str, Any]:
    """init_distributed() from the launcher's environment (the group is not created by the harness)."""
    assert not dist.is_initialized()
    zero_all.init_distributed(dist_backend="gloo", verbose=False)
    t = torch.tensor([float(rank)])
    comm.all_reduce(t)
    return {"world": dist.get_world_size(), "rank": dist.get_rank(), "sum": t.item(), "backend": dist.get_backend()}


def init_from_mpi_env(rank: int, world_size: int, port: int) -> dict[str, Any]:
    """init_distributed() under Open MPI's variables only (DeepSpeed's auto_mpi_discovery)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(
        OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE=str(world_size), OMPI_COMM_WORLD_LOCAL_RANK=str(rank)
    )
    zero_all.init_distributed(distributed_port=port, verbose=False)
    t = torch.tensor([1.0])
    comm.all_reduce(t)
    return {
        "env": [os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_PORT"]],
        "sum": t.item(),
        "local_rank": comm.get_local_rank(),
    }
