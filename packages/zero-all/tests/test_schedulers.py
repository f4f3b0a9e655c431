"""DeepSpeed's LR schedules against hand-computed values (formulas from deepspeed/runtime/lr_schedules.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zero_all.schedulers import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(sched, opt, n: int) -> list[float]:
    out = []
    for _ in range(n):
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def test_warmup_lr_log() -> None:
    opt = _opt()
    s = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.01, warmup_num_steps=10)
    assert opt.param_groups[0]["lr"] == 0.0  # constructor applies step -1 (min lr)
    got = _lrs(s, opt, 12)
    want = [0.01 * math.log(i + 1) / math.log(10) for i in range(10)] + [0.01, 0.01]
    assert got == pytest.approx(want, rel=1e-15, abs=0)


def test_warmup_lr_linear_and_min() -> None:
    opt = _opt()
    s = WarmupLR(opt, warmup_min_lr=0.001, warmup_max_lr=0.011, warmup_num_steps=4, warmup_type="linear")
    assert _lrs(s, opt, 6) == pytest.approx([0.001, 0.0035, 0.006, 0.0085, 0.011, 0.011])


def test_warmup_num_steps_one_uses_two_like_deepspeed() -> None:
    opt = _opt()
    s = WarmupLR(opt, warmup_max_lr=1.0, warmup_num_steps=1, warmup_type="linear")
    assert _lrs(s, opt, 3) == pytest.approx([0.0, 0.5, 1.0])


def test_warmup_decay_lr() -> None:
    opt = _opt()
    s = WarmupDecayLR(opt, total_num_steps=10, warmup_max_lr=1.0, warmup_num_steps=4, warmup_type="linear")
    got = _lrs(s, opt, 12)
    want = [0.0, 0.25, 0.5, 0.75] + [(10 - i) / 6 for i in range(4, 12)]
    want = [max(0.0, w) for w in want]
    assert got == pytest.approx(want)


def test_warmup_cosine_lr() -> None:
    opt = _opt(lr=0.2)
    s = WarmupCosineLR(
        opt, total_num_steps=10, warmup_min_ratio=0.1, warmup_num_steps=4, cos_min_ratio=0.01, warmup_type="linear"
    )
    got = _lrs(s, opt, 12)
    want = []
    for i in range(12):
        if i < 4:
            ratio = 0.1 + (i / 4) * 0.9
        else:
            progress = min(1.0, (i - 4 + 1) / 6)
            ratio = 0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2
        want.append(0.2 * ratio)
    assert got == pytest.approx(want)


def test_lr_range_test_continuous_and_staircase() -> None:
    opt = _opt()
    s = LRRangeTest(opt, lr_range_test_min_lr=0.01, lr_range_test_step_size=2, lr_range_test_step_rate=0.5)
    assert opt.param_groups[0]["lr"] == 0.01
    assert _lrs(s, opt, 3) == pytest.approx([0.01 * (1 + 0.5 * (i + 1) / 2) for i in range(3)])
    opt = _opt()
    s = LRRangeTest(opt, 0.01, 2, 0.5, lr_range_test_staircase=True)
    assert _lrs(s, opt, 4) == pytest.approx([0.01 * (1 + 0.5 * math.floor((i + 1) / 2)) for i in range(4)])


def test_one_cycle_lr_and_momentum() -> None:
    opt = _opt()
    s = OneCycle(opt, cycle_min_lr=0.1, cycle_max_lr=1.1, cycle_first_step_size=4, decay_lr_rate=0.5, decay_step_size=2)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    got, moms = [], []
    for _ in range(10):
        s.step()
        got.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"][0])
    # step k uses batch_iteration k+1: up over 4, down over 4, then decay min_lr / (1 + 0.5 * n/2)
    scale = [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25]
    want = [0.1 + 1.0 * f for f in scale] + [0.1 / (1 + 0.5 * n / 2) for n in (0, 1, 2)]
    # iteration 7: batch_iteration 8 = end of cycle -> scale 0
    want[7] = 0.1
    assert got[:7] == pytest.approx(want[:7])
    assert got[8:] == pytest.approx([0.1 / (1 + 0.5 * 1 / 2), 0.1 / (1 + 0.5 * 2 / 2)])
    assert moms[:4] == pytest.approx([0.9 - 0.1 * f for f in scale[:4]])


def test_state_dict_is_json_and_resumes() -> None:
    opt = _opt()
    s = build_scheduler("WarmupDecayLR", opt, {"total_num_steps": 20, "warmup_max_lr": 0.5, "warmup_num_steps": 5})
    for _ in range(7):
        s.step()
    sd = json.loads(json.dumps(s.state_dict()))
    opt2 = _opt()
    s2 = build_scheduler("WarmupDecayLR", opt2, {"total_num_steps": 20, "warmup_max_lr": 0.5, "warmup_num_steps": 5})
    s2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    s.step()
    s2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_bad_scheduler_params() -> None:
    with pytest.raises(ValueError, match="warmup_num_steps must be a positive integer"):
        WarmupLR(_opt(), warmup_num_steps=0)
    with pytest.raises(ValueError, match="warmup_type must be 'log' or 'linear'"):
        WarmupLR(_opt(), warmup_type="cubic")
