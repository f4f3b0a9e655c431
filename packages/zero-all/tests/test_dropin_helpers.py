"""DeepSpeed's helper names: ops.adam, lr_schedules constants, zero_to_fp32, the estimators, DeepSpeedConfig.

Each is compared with what DeepSpeed (or torch) computes: Adam against torch.optim.AdamW/Adam or the
written-out formula, the estimators against DeepSpeed's formulas evaluated by hand, zero_to_fp32
against the trained model's own parameters.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import zero_all
from zero_all import estimators, lr_schedules
from zero_all.cli import main
from zero_all.config import ConfigError
from zero_all.ops.adam import DeepSpeedCPUAdam, FusedAdam
from zero_all.utils.zero_to_fp32 import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
)

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- ops.adam


def _train(opt_cls: type, steps: int = 6, **kw: object) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    opt = opt_cls(model.parameters(), **kw)
    for s in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(s))).pow(2).sum().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [FusedAdam, DeepSpeedCPUAdam])
@pytest.mark.parametrize("adamw", [True, False])
def test_adam_names_match_torch(cls: type, adamw: bool) -> None:
    mode = {"adam_w_mode": adamw} if cls is FusedAdam else {"adamw_mode": adamw}
    ours = _train(cls, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), **mode)
    ref = _train(torch.optim.AdamW if adamw else torch.optim.Adam, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adam_without_bias_correction_follows_the_formula() -> None:
    """bias_correction=False: p -= lr * m / (sqrt(v) + eps), m and v the raw moments (DeepSpeed's kernel)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(10))
    ref = p.detach().clone()
    opt = FusedAdam([p], lr=0.1, bias_correction=False, betas=(0.9, 0.999), eps=1e-8)
    m = torch.zeros(10)
    v = torch.zeros(10)
    for s in range(3):
        g = torch.randn(10, generator=torch.Generator().manual_seed(s))
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - 0.1 * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6)


def test_adam_refusals_and_options() -> None:
    with pytest.raises(RuntimeError, match="AMSGrad"):
        FusedAdam([nn.Parameter(torch.zeros(1))], amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        DeepSpeedCPUAdam([nn.Parameter(torch.zeros(1))], amsgrad=True)
    with pytest.warns(UserWarning, match="fp32_optimizer_states=False"):
        DeepSpeedCPUAdam([nn.Parameter(torch.zeros(1))], fp32_optimizer_states=False)
    p = nn.Parameter(torch.zeros(2))
    keep = FusedAdam([p], set_grad_none=False)
    p.grad = torch.ones(2)
    keep.zero_grad()
    assert p.grad is not None and torch.equal(p.grad, torch.zeros(2))
    FusedAdam([p]).zero_grad()
    assert p.grad is None
    assert isinstance(keep, torch.optim.Optimizer)


# ---------------------------------------------------------------- lr_schedules module


def test_lr_schedule_constants_are_deepspeeds() -> None:
    assert lr_schedules.VALID_LR_SCHEDULES == ["LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]
    assert (lr_schedules.WARMUP_LR, lr_schedules.WARMUP_MIN_LR, lr_schedules.WARMUP_MAX_LR) == (
        "WarmupLR",
        "warmup_min_lr",
        "warmup_max_lr",
    )
    assert (lr_schedules.WARMUP_LOG_RATE, lr_schedules.WARMUP_LINEAR_RATE) == ("log", "linear")
    assert lr_schedules.CYCLE_FIRST_STEP_SIZE == "cycle_first_step_size" and lr_schedules.TOTAL_NUM_STEPS == (
        "total_num_steps"
    )
    # every name constant is a parameter of the schedule it belongs to
    from zero_all.schedulers import scheduler_param_names

    assert lr_schedules.WARMUP_NUM_STEPS in scheduler_param_names("WarmupLR")
    assert lr_schedules.COS_MIN_RATIO in scheduler_param_names("WarmupCosineLR")
    assert lr_schedules.LR_RANGE_TEST_STAIRCASE in scheduler_param_names("LRRangeTest")


def test_add_tuning_arguments_and_config_from_args() -> None:
    parser = zero_all.add_tuning_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--lr_schedule", "WarmupLR", "--warmup_num_steps", "50", "--warmup_max_lr", "0.01"])
    assert (args.warmup_min_lr, args.warmup_type, args.cycle_min_lr, args.lr_range_test_step_size) == (
        0,
        "log",
        0.01,
        1000,
    )
    cfg, err = lr_schedules.get_config_from_args(args)
    assert err is None
    assert cfg == {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.01, "warmup_num_steps": 50, "warmup_type": "log"},
    }
    assert lr_schedules.get_lr_from_config(cfg) == (0.01, "")
    # the section it builds is one zero-all accepts and runs
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    zero_all.schedulers.build_scheduler(cfg["type"], opt, cfg["params"])
    none, why = lr_schedules.get_config_from_args(parser.parse_args([]))
    assert none is None and "--lr_schedule not specified" in why


# ---------------------------------------------------------------- zero_to_fp32


def _trained_checkpoint(tmp_path: Path, stage: int) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05}},
        "zero_optimization": {"stage": stage},
    }
    engine, *_ = zero_all.initialize(model=model, config=cfg)
    for s in range(3):
        engine.backward(engine(torch.randn(4, 5, generator=torch.Generator().manual_seed(s))).pow(2).mean())
        engine.step()
    engine.save_checkpoint(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("stage", [0, 2])
def test_zero_to_fp32_functions(tmp_path: Path, stage: int) -> None:
    model, ckpt = _trained_checkpoint(tmp_path, stage)
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt)  # the tag comes from `latest`
    expected = model.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="global_step3").keys() == state.keys()
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    returned = load_state_dict_from_zero_checkpoint(fresh, ckpt)
    assert returned is fresh
    for (k, a), b in zip(fresh.state_dict().items(), expected.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    path = convert_zero_checkpoint_to_fp32_state_dict(ckpt, tmp_path / "out")
    assert path.name == "model.safetensors" and load_file(path).keys() == state.keys()
    with pytest.raises(KeyError, match="does not have"):
        load_state_dict_from_zero_checkpoint(nn.Linear(5, 6), ckpt)
    with pytest.raises(NotImplementedError, match="exclude_frozen_parameters"):
        get_fp32_state_dict_from_zero_checkpoint(ckpt, exclude_frozen_parameters=True)


# ---------------------------------------------------------------- estimators


def test_zero2_estimates_follow_deepspeeds_formula(capsys: pytest.CaptureFixture[str]) -> None:
    params, gpus, nodes = 1_300_000_000, 8, 2
    total = gpus * nodes
    cpu, gpu = estimators.estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)
    assert gpu == 2 * params + int(18 * params / total) and cpu == int(params * 4 * gpus * 1.5)
    cpu, gpu = estimators.estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=True)
    assert gpu == 2 * params and cpu == int(params * max(4 * total, 16) * 1.5)
    estimators.estimate_zero2_model_states_mem_needs_all_cold(params, gpus, nodes)
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "Estimated memory needed for params, optim states and gradients for a:",
        "HW: Setup with 2 nodes, 8 GPUs per node.",
        "SW: Model with 1300M total params.",
        "  per CPU  |  per GPU |   Options",
    ]
    # 1.3e9 * 64 * 1.5 bytes = 116.23 GiB; 2.6e9 bytes = 2.42 GiB
    assert out[4] == "  116.23GB |   2.42GB | offload_optimizer=cpu "
    assert (
        out[5]
        == f" {params * 4 * 8 * 1.5 / 2**30:7.2f}GB | {(2.6e9 + int(18 * params / 16)) / 2**30:6.2f}GB | offload_optimizer=none"
    )


def test_zero3_estimates_and_live_model(capsys: pytest.CaptureFixture[str]) -> None:
    P, L = 10**9, 5 * 10**7
    cpu, gpu, largest = estimators.estimate_zero3_model_states_mem_needs(P, L, 4, 1, cpu_offload=False)
    assert (gpu, largest, cpu) == (4 * L + int(18 * P / 4), 4 * L, int(L * 4 * 4 * 1.5))
    cpu, gpu, _ = estimators.estimate_zero3_model_states_mem_needs(P, L, 4, 2, True, False, zero_init=False)
    assert gpu == 4 * L + int(2 * P / 8) and cpu == int(P * max(16, 16 * 0.5) * 1.5)
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 10))
    model[1].weight = nn.Parameter(torch.zeros(10, 200))
    assert estimators.model_to_params(model) == (100 * 200 + 200 + 10 * 200 + 10, 100 * 200 + 200)
    tied = nn.Linear(4, 4, bias=False)
    assert estimators.model_to_params(nn.Sequential(tied, tied)) == (16, 16)  # shared params counted once
    estimators.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "HW: Setup with 1 node, 2 GPUs per node." and len(out) == 4 + 6
    assert out[4].endswith("offload_param=cpu , offload_optimizer=cpu , zero_init=1")
    assert out[-1].endswith("offload_param=none, offload_optimizer=none, zero_init=0")
    with pytest.raises(ValueError, match="num_gpus_per_node"):
        estimators.estimate_zero2_model_states_mem_needs(10, 0)


def test_estimate_cli_prints_the_same_tables(capsys: pytest.CaptureFixture[str]) -> None:
    estimators.estimate_zero2_model_states_mem_needs_all_cold(350_000_000, 4)
    estimators.estimate_zero3_model_states_mem_needs_all_cold(350_000_000, 20_000_000, 4)
    expected = capsys.readouterr().out
    assert main(["estimate", "--params", "350M", "--gpus-per-node", "4", "--largest-layer-params", "2e7"]) == 0
    assert capsys.readouterr().out == expected.replace("params.\nEstimated", "params.\n\nEstimated", 1).replace(
        "offload_optimizer=none\nEstimated", "offload_optimizer=none\n\nEstimated", 1
    )
    with pytest.raises(SystemExit):
        main(["estimate", "--params", "lots"])
    with pytest.raises(SystemExit):
        main(["estimate", "--params", "1B", "--stage", "3"])  # stage 3 needs the largest layer


# ---------------------------------------------------------------- DeepSpeedConfig


def test_deepspeed_config_derives_batch_sizes(tmp_path: Path) -> None:
    mpu = types.SimpleNamespace(get_data_parallel_world_size=lambda: 4)
    c = zero_all.DeepSpeedConfig({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, mpu)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (32, 4, 2)
    assert c.world_size == 4 and c.zero_optimization_stage == 0 and not c.zero_enabled
    path = tmp_path / "ds.hjson"
    path.write_text(
        """{
          # hjson, as DeepSpeed reads configs: comments, unquoted keys and strings, optional commas
          train_micro_batch_size_per_gpu: 2
          gradient_accumulation_steps: 3
          zero_optimization: {
            stage: 2
          }
          bf16: {"enabled": true,}
          optimizer: {
            type: AdamW
            params: {lr: 0.001}
          }
          scheduler: {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        }"""
    )
    c = zero_all.DeepSpeedConfig(str(path))
    assert (c.train_batch_size, c.gradient_accumulation_steps, c.world_size) == (6, 3, 1)
    assert c.zero_optimization_stage == 2 and c.zero_enabled and c.bfloat16_enabled and not c.fp16_enabled
    assert c.optimizer_name == "adamw" and c.optimizer_params == {"lr": 0.001}
    assert c.scheduler_name == "WarmupLR" and c.gradient_allreduce_op == "mean"
    with pytest.raises(ConfigError, match=r"8 != 3 \* 1 \* 2|train_batch_size"):
        zero_all.DeepSpeedConfig(
            {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 3},
            types.SimpleNamespace(get_data_parallel_world_size=lambda: 2),
        )
    with pytest.raises(ConfigError, match="'auto'"):
        zero_all.DeepSpeedConfig({"train_micro_batch_size_per_gpu": "auto"})
    encoded = base64.urlsafe_b64encode(json.dumps({"train_micro_batch_size_per_gpu": 5}).encode()).decode()
    assert zero_all.DeepSpeedConfig(encoded).train_batch_size == 5  # DeepSpeed accepts base64 too


def test_math_of_step_size_validation_matches_deepspeed() -> None:
    """Sanity: DeepSpeed's OneCycle allows a zero second half (the cycle is all ramp-up)."""
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = zero_all.schedulers.OneCycle(opt, 0.1, 1.0, cycle_first_step_size=4, cycle_second_step_size=0)
    for _ in range(3):
        s.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 + 0.9 * 3 / 4)


# ---------------------------------------------------------------- deepspeed.utils logging helpers


def test_log_dist_and_see_memory_usage(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from zero_all.utils import get_dist_msg, log_dist, see_memory_usage

    # Before/without a process group in this process DeepSpeed logs everywhere, as rank -1.
    if not torch.distributed.is_initialized():
        assert get_dist_msg("hello", ranks=[3]) == "[Rank -1] hello"
    else:
        rank = torch.distributed.get_rank()
        assert get_dist_msg("hello", ranks=[rank]) == f"[Rank {rank}] hello"
        assert get_dist_msg("hello", ranks=[rank + 1]) is None
        assert get_dist_msg("hello", ranks=[-1]) == f"[Rank {rank}] hello"
        assert get_dist_msg("hello") is None
    with caplog.at_level("INFO", logger="zero_all"):
        log_dist("to the log", ranks=[-1])
    assert "to the log" in caplog.text
    see_memory_usage("quiet")  # force=False: nothing, as DeepSpeed
    assert capsys.readouterr().out == ""
    see_memory_usage("loud", force=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "loud" and lines[1].startswith("MA ") and lines[2].startswith("CPU Virtual Memory:  used = ")
