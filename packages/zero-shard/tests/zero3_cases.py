"""Rank functions for the stage-3 tests: a tiny GPT with tied embeddings and a block called twice.

Data as in zero_cases: a fixed global batch per micro-step, rank r of N trains on slice r.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zero_shard import CollectiveChoice, GatheredParameters, Init, ZeroConfig, ZeroShardedOptimizer
from zero_shard.partition import UnitGatherError

VOCAB, D, SEQ, GLOBAL_BATCH = 40, 16, 6, 8
LR, WD = 1e-2, 0.01
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.relu(self.fc(self.ln(x))))


class TinyGPT(nn.Module):
    """Embedding tied to the head, two blocks, and a ``shared`` block applied twice per forward."""

    def __init__(self, layers: int = 2, skip_on_rank: int | None = None) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Parameter(torch.randn(SEQ, D) * 0.02)
        self.blocks = nn.ModuleList([Block(D) for _ in range(layers)])
        self.shared = Block(D)
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.wte.weight
        self.skip_on_rank = skip_on_rank

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for i, b in enumerate(self.blocks):
            if i == 1 and self.skip_on_rank is not None and dist.get_rank() == self.skip_on_rank:
                continue  # a layer skipped on one rank only
            x = b(x)
        x = self.shared(self.shared(x))
        return self.head(self.ln_f(x))


def make_model(**kw: Any) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(**kw)


def batch(step: int, micro: int, rank: int, world_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + micro)
    idx = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    n = GLOBAL_BATCH // world_size
    return idx[rank * n : (rank + 1) * n]


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def params_np(model: nn.Module) -> dict[str, Any]:
    return {n: p.detach().float().numpy().copy() for n, p in model.named_parameters()}


def run_ddp(rank: int, world_size: int, steps: int, ga: int, clip: float = 0.0) -> dict[str, Any]:
    """Reference: DDP + torch.optim.AdamW, fp32."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(ga):
            ctx = ddp.no_sync() if (world_size > 1 and micro < ga - 1) else contextlib.nullcontext()
            with ctx:
                loss = lm_loss(ddp, batch(step, micro, rank, world_size)) / ga
                loss.backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        t = torch.tensor([total])
        if world_size > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world_size)
    return {"losses": losses, "params": params_np(model)}


def _adamw(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=LR, weight_decay=WD)


def build(
    stage: int,
    dtype: str = "fp32",
    clip: float = 0.0,
    model: nn.Module | None = None,
    grad_collective: str | None = None,
    **zero: Any,
) -> Any:
    model = model if model is not None else make_model()
    cfg = ZeroConfig(stage=stage, **zero)
    opt = ZeroShardedOptimizer(
        list(model.named_parameters()),
        _adamw,
        cfg,
        compute_dtype=DTYPES[dtype],
        gradient_clipping=clip,
        module=model,
        loss_scaler=_scaler(dtype),
        collectives=CollectiveChoice(grad_collective, "broadcast") if grad_collective else None,
    )
    return model, opt


def _scaler(dtype: str) -> Any:
    if dtype != "fp16":
        return None
    from amp_scaler import DynamicLossScaler

    return DynamicLossScaler(init_scale=2.0**8)


def run_zero(
    rank: int,
    world_size: int,
    stage: int,
    dtype: str,
    steps: int,
    ga: int,
    clip: float = 0.0,
    grad_collective: str | None = None,
    **zero: Any,
) -> dict[str, Any]:
    """Train with ZeroShardedOptimizer; returns losses, the full final parameters, memory and fetch counts."""
    model, opt = build(stage, dtype, clip, grad_collective=grad_collective, **zero)
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(ga):
            opt.set_gradient_accumulation_boundary(micro == ga - 1)
            loss = lm_loss(model, batch(step, micro, rank, world_size)) / ga
            opt.backward(loss)
            total += loss.item()
        opt.step()
        t = torch.tensor([total])
        if world_size > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world_size)
    between_steps = opt.state_bytes()
    with GatheredParameters(list(model.parameters())):
        final = params_np(model)
    coord = opt.coordinator
    return {
        "losses": losses,
        "params": final,
        "bytes": between_steps,
        "numel": sum(p.numel() for p in model.parameters()),
        "persistent_numel": sum(u.layout.numel for u in getattr(opt, "units", []) if u.persistent),
        "fetches": coord.fetches if coord else 0,
        "prefetches": coord.prefetches if coord else 0,
        "gathers": coord.fetches + coord.prefetches if coord else 0,
        "checks": coord.checks if coord else 0,
        "ahead_checks": coord.ahead_checks if coord else 0,
        "sub_groups": opt.last_step_sub_groups,
        "units": len(getattr(opt, "units", [])),
        "bucket_segments": [len(b.segments) for b in opt.reducer.buckets],
    }


def run_skip_one_rank(rank: int, world_size: int) -> str:
    """A forward that skips a layer on rank 1 only: must raise (naming modules), never hang."""
    model, opt = build(3, stage3_param_persistence_threshold=0)
    model.skip_on_rank = 1
    try:
        loss = lm_loss(model, batch(0, 0, rank, world_size))
        opt.backward(loss)
        opt.step()
    except UnitGatherError as e:
        return str(e)
    return "no error"


def run_gathered(rank: int, world_size: int) -> dict[str, Any]:
    """GatheredParameters for reading, and with modifier_rank=0 writing back into the partitions.

    bf16, so that the fp32 master is a separate tensor that must be written back too."""
    model, _opt = build(3, "bf16", stage3_param_persistence_threshold=0)
    w = model.blocks[0].fc.weight
    released = w.untyped_storage().nbytes() == 0
    with GatheredParameters(w):
        inside = w.detach().clone()
    after_read = w.untyped_storage().nbytes() == 0
    with GatheredParameters(w, modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                w.fill_(0.5)
    with GatheredParameters(w):
        value = w.detach().clone()
    unit = w._zero3_unit
    return {
        "released_before": released,
        "released_after_read": after_read,
        "inside_sum": float(inside.sum()),
        "modified_all_half": bool(torch.all(value == 0.5)),
        "master_tracks_shard": bool(torch.equal(unit.master, unit.shard.float())),
        "master_changed": bool((unit.master == 0.5).any()),
    }


class Wide(nn.Module):
    """32 layers of 1024x1024 (33.6M parameters, 128 MiB in fp32) for the zero.Init memory cap test."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(1024, 1024, bias=False) for _ in range(32)])
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_init_under_cap(rank: int, world_size: int) -> dict[str, Any]:
    """Build Wide under zero.Init: the peak memory growth stays far below the whole model's size."""
    whole_mb = sum(p.numel() for p in _plain_wide(meta=True).parameters()) * 4 / 2**20
    # Have glibc return freed blocks over 64 KiB to the OS at once (else its adaptive mmap threshold keeps
    # freed 4 MiB layers in the heap), so that the peak RSS measures live memory.
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    torch.manual_seed(0)
    before = _rss_peak_mb()
    with Init():
        model = Wide()
    grown = _rss_peak_mb() - before
    shapes_ok = all(p.numel() == 0 and tuple(p.ds_shape) == (1024, 1024) for p in model.parameters())
    plain = _plain_wide()
    with GatheredParameters(model.layers[3].weight):
        same_init = bool(torch.equal(model.layers[3].weight, plain.layers[3].weight))
    # The partitioned model trains at stage 3.
    model, opt = build(3, model=model, stage3_param_persistence_threshold=0)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(rank))
    loss = model(x).pow(2).mean()
    opt.backward(loss)
    opt.step()
    return {
        "whole_mb": whole_mb,
        "grown_mb": grown,
        "shapes_ok": shapes_ok,
        "same_init": same_init,
        "loss": loss.item(),
    }


def _plain_wide(meta: bool = False) -> Wide:
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return Wide()
    return Wide()


def run_rank_missing_from_gather(rank: int, world_size: int) -> dict[str, Any]:
    """Rank 1 never runs the forward: rank 0's gather must end at the group's timeout, naming rank and module."""
    import time
    from datetime import timedelta

    group = dist.new_group(timeout=timedelta(seconds=4))
    model = make_model()
    opt = ZeroShardedOptimizer(
        list(model.named_parameters()),
        _adamw,
        ZeroConfig(stage=3, stage3_param_persistence_threshold=0),
        module=model,
        process_group=group,
    )
    error, took = None, 0.0
    if rank == 0:
        t0 = time.monotonic()
        try:
            opt.backward(lm_loss(model, batch(0, 0, rank, world_size)))
        except UnitGatherError as e:
            error = str(e)
        took = time.monotonic() - t0
    dist.barrier()
    return {"error": error, "took": took}
