"""Rank functions for the engine's stage-3 tests: a tiny GPT (tied embedding, a block used twice).

Same data scheme as engine_cases: a fixed global batch per micro-step, rank r of N trains on slice r.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import zero_all

VOCAB, D, SEQ, GLOBAL_MICRO, GAS, LR = 48, 16, 8, 8, 2, 1e-2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.proj = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.relu(self.fc(self.ln(x))))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.shared = Block()
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx[:, :-1])
        for b in self.blocks:
            x = b(x)
        x = self.shared(self.shared(x))
        logits = self.head(self.ln_f(x))
        return nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def make_model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def _config(stage: int, **zero: Any) -> dict[str, Any]:
    return {
        "train_batch_size": GLOBAL_MICRO * GAS,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
        # Threshold 0: every parameter partitioned (none kept whole), the strictest case.
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, **zero},
    }


def batch(step: int, micro: int, rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + micro)
    idx = torch.randint(0, VOCAB, (GLOBAL_MICRO, SEQ), generator=g)
    n = GLOBAL_MICRO // world
    return idx[rank * n : (rank + 1) * n]


def train(engine: Any, rank: int, world: int, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        total = 0.0
        for micro in range(GAS):
            loss = engine(batch(step, micro, rank, world))
            engine.backward(loss)
            engine.step()
            total += loss.item()
        t = torch.tensor(total / GAS, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        losses.append(float(t) / world)
    return losses


def train_ddp(rank: int, world: int, steps: int) -> list[float]:
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(GAS):
            if micro < GAS - 1 and world > 1:
                with ddp.no_sync():
                    (ddp(batch(step, micro, rank, world)) / GAS).backward()
                    continue
            loss = ddp(batch(step, micro, rank, world))
            (loss / GAS).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return losses


def engine_stage3_vs_ddp_and_save(rank: int, world: int, ckpt: str, out16: str) -> dict[str, Any]:
    """Stage 3 through initialize(): losses vs stage 2 and DDP; save a checkpoint at step 4, 16-bit export."""
    ref_model = make_model()
    ref_engine, *_ = zero_all.initialize(model=ref_model, config=_config(2))
    ref = train(ref_engine, rank, world, 0, 6)
    model = make_model()
    cfg = _config(3, stage3_gather_16bit_weights_on_model_save=True)
    engine, *_ = zero_all.initialize(model=model, config=cfg)
    losses = train(engine, rank, world, 0, 4)
    engine.save_checkpoint(ckpt, client_state={"note": "stage3"})
    losses += train(engine, rank, world, 4, 6)
    wrote = engine.save_16bit_model(out16, "model.safetensors")
    full = engine.consolidated_state_dict()
    state_keys = sorted(engine.module.state_dict().keys())
    engine.empty_partition_cache()
    return {
        "ref": ref,
        "losses": losses,
        "wrote": wrote,
        "full": {k: v.float().numpy() for k, v in full.items()} if full is not None else None,
        "state_keys": state_keys,
        "released": all(p.untyped_storage().nbytes() == 0 for p in model.blocks[0].fc.parameters()),
    }


def resume(rank: int, world: int, stage: int, ckpt: str) -> dict[str, Any]:
    """Load the stage-3 checkpoint at another stage / world size and continue steps 4-6."""
    model = make_model()
    engine, *_ = zero_all.initialize(model=model, config=_config(stage))
    path, client = engine.load_checkpoint(ckpt)
    return {"losses": train(engine, rank, world, 4, 6), "client": client, "path": path}


def stage2_checkpoint_loads_at_stage3(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    """Save at stage 2, load at stage 3 (same world size): the continuation matches stage 2's."""
    model = make_model()
    engine, *_ = zero_all.initialize(model=model, config=_config(2))
    train(engine, rank, world, 0, 3)
    engine.save_checkpoint(ckpt)
    want = train(engine, rank, world, 3, 5)
    model3 = make_model()
    engine3, *_ = zero_all.initialize(model=model3, config=_config(3))
    engine3.load_checkpoint(ckpt)
    return {"want": want, "got": train(engine3, rank, world, 3, 5)}


def save_16bit_refused_without_flag(rank: int, world: int, out: str) -> dict[str, Any]:
    model = make_model()
    engine, *_ = zero_all.initialize(model=model, config=_config(3))
    train(engine, rank, world, 0, 1)
    return {"wrote": engine.save_16bit_model(out), "exists": Path(out, "model.safetensors").exists()}


def np_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def init_then_initialize(rank: int, world: int) -> dict[str, Any]:
    """zero_all.zero.Init builds partitioned; initialize() at stage 3 trains it like an unpartitioned build."""
    torch.manual_seed(0)
    with zero_all.zero.Init():
        model = TinyGPT()
    empty = all(p.numel() == 0 for p in model.parameters())
    engine, *_ = zero_all.initialize(model=model, config=_config(3))
    got = train(engine, rank, world, 0, 2)
    plain, *_ = zero_all.initialize(model=make_model(), config=_config(3))
    want = train(plain, rank, world, 0, 2)
    return {"empty": empty, "got": got, "want": want}
