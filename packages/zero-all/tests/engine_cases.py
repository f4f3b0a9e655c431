"""Rank functions for the engine tests: initialize() from a ds_config dict vs torch DDP + AdamW.

Data: each optimizer step has GAS micro-steps; micro-step m of step s has a fixed global batch of
GLOBAL_MICRO samples, and rank r of N trains on slice r. Any world size therefore sees the same
global batch per step, so losses (averaged over ranks and micro-steps) are comparable across
world sizes. Rank functions return numpy / floats, never tensors (torch shares tensors between
processes through file descriptors that die with the rank).
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import zero_all
from zero_all.schedulers import WarmupLR

HF_CONFIGS = Path(__file__).resolve().parents[3] / "examples" / "deepspeed_configs"
GLOBAL_MICRO = 8
GAS = 2
LR = 1e-2
CLIP = 0.5


class TinyNet(nn.Module):
    """An MLP with a LayerNorm: 5 parameter tensors of different sizes (uneven partitions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.fc2(self.norm(torch.tanh(self.fc1(x)))), y)


def make_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def ds_config(world_size: int, stage: int, **over: Any) -> dict[str, Any]:
    cfg = {
        "train_batch_size": GLOBAL_MICRO * GAS,
        "gradient_accumulation_steps": GAS,  # micro batch = 16 / (2 x world size)
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 5, "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 100},  # small buckets: several per backward
    }
    cfg.update(over)
    return cfg


def batch(step: int, micro: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(GLOBAL_MICRO, 12, generator=g)
    y = torch.tanh(x[:, :4] - x[:, 4:8])  # learnable, so the loss falls
    n = GLOBAL_MICRO // world_size
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def _global_mean(values: list[float]) -> float:
    t = torch.tensor(sum(values) / len(values), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def train_engine(engine: Any, rank: int, world_size: int, start: int, stop: int) -> list[float]:
    """Steps [start, stop): the global mean loss of each step."""
    out = []
    for step in range(start, stop):
        losses = []
        for m in range(GAS):
            x, y = batch(step, m, rank, world_size)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        assert engine.global_steps == step + 1
        out.append(_global_mean(losses))
    return out


def train_ddp(rank: int, world_size: int, steps: int) -> list[float]:
    """The reference: torch DDP + torch.optim.AdamW + the same WarmupLR + clip_grad_norm_."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=LR, warmup_num_steps=5, warmup_type="linear")
    out = []
    for step in range(steps):
        losses = []
        for m in range(GAS):
            x, y = batch(step, m, rank, world_size)
            if m < GAS - 1:
                with ddp.no_sync():
                    loss = ddp(x, y)
                    (loss / GAS).backward()
            else:
                loss = ddp(x, y)
                (loss / GAS).backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(_global_mean(losses))
    return out


def params_np(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().float().numpy().copy() for n, p in model.named_parameters()}


def engine_vs_ddp_and_resume(rank: int, world_size: int, stage: int, ckpt: str) -> dict[str, Any]:
    """Engine vs DDP for 20 steps; a checkpoint at step 10; a fresh engine resumed from it."""
    ref = train_ddp(rank, world_size, 20)

    engine, *_ = zero_all.initialize(model=make_model(), config=ds_config(world_size, stage))
    assert engine.train_micro_batch_size_per_gpu() == GLOBAL_MICRO // world_size
    first = train_engine(engine, rank, world_size, 0, 10)
    engine.save_checkpoint(ckpt, client_state={"step": 10, "note": "ten"})
    at_save = params_np(engine.module)
    rest = train_engine(engine, rank, world_size, 10, 20)

    # A fresh engine (different initial weights) resumed from the checkpoint.
    torch.manual_seed(123)
    model2 = TinyNet()
    engine2, *_ = zero_all.initialize(model=model2, config=ds_config(world_size, stage))
    path, client_state = engine2.load_checkpoint(ckpt)
    resumed_params = params_np(engine2.module)
    resumed = train_engine(engine2, rank, world_size, 10, 20)
    return {
        "ref": ref,
        "engine": first + rest,
        "resumed": resumed,
        "path": path,
        "client_state": client_state,
        "at_save": at_save,
        "resumed_params": resumed_params,
        "lr": engine.get_lr(),
        "grad_norm": engine.get_global_grad_norm(),
        "skipped": engine.was_step_skipped(),
        "global_steps": engine2.global_steps,
    }


def resume_elsewhere(rank: int, world_size: int, stage: int, ckpt: str, bad_ckpt: str | None) -> dict[str, Any]:
    """Load a world-size-2 stage-2 checkpoint at another world size / stage and continue 10 steps."""
    torch.manual_seed(7)
    engine, *_ = zero_all.initialize(model=TinyNet(), config=ds_config(world_size, stage))
    _, client_state = engine.load_checkpoint(ckpt, tag="global_step10")
    losses = train_engine(engine, rank, world_size, 10, 20)
    error = None
    if bad_ckpt is not None:
        try:
            engine.load_checkpoint(bad_ckpt)
        except zero_all.CheckpointCorruptError as e:
            error = str(e)
    # Weights only: parameters from the fp32 master copy, optimizer state fresh.
    engine.load_checkpoint(ckpt, tag="global_step10", load_optimizer_states=False)
    weights_only = params_np(engine.module)
    return {
        "losses": losses,
        "client_state": client_state,
        "error": error,
        "lr": engine.get_lr(),
        "weights_only": weights_only,
        "global_steps": engine.global_steps,
    }


def _fp16_overflow_skips() -> dict[str, Any]:
    """fp16: an overflowing step is skipped: no schedule step, the scale halves, the next step runs."""
    cfg = ds_config(1, 1, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1})
    engine, *_ = zero_all.initialize(model=make_model(), config=cfg)
    seen = []
    for step in range(2):
        for m in range(GAS):
            x, y = batch(step, m, 0, 1)
            loss = engine(x.half(), y.half())
            engine.backward(loss * (1e6 if step == 0 else 1.0))  # step 0: fp16 gradients overflow
            engine.step()
        seen.append((engine.was_step_skipped(), engine.get_lr()[0], engine.loss_scale, engine.global_steps))
    return {"seen": seen, "dtype": str(next(engine.module.parameters()).dtype)}


def _bf16_frozen_and_buffers() -> dict[str, Any]:
    """bf16: trained, frozen parameters and floating buffers all end up in bf16; training runs."""
    model = make_model()
    model.fc1.requires_grad_(False)
    model.register_buffer("scale", torch.ones(4))
    cfg = ds_config(1, 2, bf16={"enabled": True})
    engine, *_ = zero_all.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg
    )
    x, y = batch(0, 0, 0, 1)
    loss = engine(x.bfloat16(), y.bfloat16())
    engine.backward(loss)
    engine.step()
    return {
        "dtypes": sorted({str(t.dtype) for t in [*model.parameters(), *model.buffers()]}),
        "loss": float(loss.detach().float()),
    }


def initialize_errors(rank: int, world_size: int) -> dict[str, Any]:
    """initialize()'s error paths (config problems it can only see with the model and world size)."""
    cases = {
        "batch": ({"train_batch_size": 3, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"}}, {}),
        "auto_micro": (
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": 2,
                "optimizer": {"type": "AdamW"},
            },
            {},
        ),
        "no_optimizer": ({"train_batch_size": 4}, {}),
        "onebit": (
            {
                "train_batch_size": 4,
                "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}},
                "zero_optimization": {"stage": 1},
            },
            {},
        ),
        "lr_auto": ({"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, {}),
        "offload": (
            {
                "train_batch_size": 4,
                "optimizer": {"type": "AdamW"},
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
            },
            {},
        ),
        "fp16_and_bf16": (
            {
                "train_batch_size": 4,
                "optimizer": {"type": "AdamW"},
                "fp16": {"enabled": True},
                "bf16": {"enabled": True},
            },
            {},
        ),
        "stage3_nvme": (
            {
                "train_batch_size": 4,
                "optimizer": {"type": "AdamW"},
                "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}},
            },
            {},
        ),
        "zero3_auto_no_loader": (str(HF_CONFIGS / "ds_config_zero3_auto.json"), {"optimizer": torch.optim.SGD}),
        "no_config": (None, {}),
        "grad_accum_fp16_on_bf16": (
            {
                "train_batch_size": 4,
                "optimizer": {"type": "AdamW"},
                "bf16": {"enabled": True},
                "data_types": {"grad_accum_dtype": "fp16"},
            },
            {},
        ),
    }
    out: dict[str, Any] = {"fp16_skip": _fp16_overflow_skips(), "bf16_frozen": _bf16_frozen_and_buffers()}
    # data_types.grad_accum_dtype reaches zero-shard: the stage-2 gradient partition's dtype.
    for name, data_types in (("accum_default", {}), ("accum_fp32", {"grad_accum_dtype": "float32"})):
        engine, *_ = zero_all.initialize(
            model=make_model(),
            config={
                "train_batch_size": 4,
                "optimizer": {"type": "AdamW"},
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 2},
                "data_types": data_types,
            },
        )
        out[name] = str(engine.optimizer.reducer.part_grads[0].dtype)
    for name, (cfg, kw) in cases.items():
        try:
            zero_all.initialize(model=make_model(), config=cfg, **kw)
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the test checks type and message
            out[name] = f"{type(e).__name__}: {e}"
    return out


def client_optimizer_and_dataloader(rank: int, world_size: int, logdir: str) -> dict[str, Any]:
    """A client torch optimizer + HF-style "auto" config + a Dataset: the engine builds the loader."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 12), torch.randn(64, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    # The Hugging Face ZeRO-2 config as written: every "auto" comes from these arguments.
    engine, zopt, dl, sched = zero_all.initialize(
        model=model,
        optimizer=opt,
        training_data=loader,
        lr_scheduler=lambda o: WarmupLR(o, warmup_max_lr=3e-3, warmup_num_steps=2),
        config=str(HF_CONFIGS / "ds_config_zero2_auto.json"),
    )
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3, weight_decay=0.0)
    engine2, _, dl2, _ = zero_all.initialize(
        model=model2,
        optimizer=opt2,
        training_data=data,
        config={
            "train_micro_batch_size_per_gpu": 4,
            "steps_per_print": 1,
            "wall_clock_breakdown": True,
            "csv_monitor": {"enabled": True, "output_path": logdir, "job_name": "job"},
        },
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for i, (x, y) in enumerate(dl2):
            loss = engine2(x, y)
            engine2.backward(loss)
            engine2.step()
            if i == 2:
                break
    engine2.destroy()
    return {
        "tbs": engine.train_batch_size(),
        "lr": engine.get_lr(),
        "loader_is_given": dl is loader,
        "dl2_batch": int(x.shape[0]),
        "dl2_len": len(dl2),
        "client_opt_lr": engine2.get_lr(),
        "inner_type": type(zopt.param_groups[0]).__name__,
        "printed": printed.getvalue(),
        "hf_stage": engine.zero_optimization_stage(),
        "hf_sched": type(sched).__name__,
    }
