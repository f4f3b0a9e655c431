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
    with pytest.raises(ValueError, match="warmup_num_steps must be a non-negative integer"):
        WarmupLR(_opt(), warmup_num_steps=-1)
    # 0 (what the HF Trainer writes without warm-up) is DeepSpeed's max(2, 0): iterations 0, 1, 2 give 0, 1/2, 1 of max.
    opt = _opt()
    s = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.01, warmup_num_steps=0, warmup_type="linear")
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == [0.0, 0.0, 0.005, 0.01], lrs  # the constructor applies iteration -1 (the min lr)
    with pytest.raises(ValueError, match="warmup_type must be 'log' or 'linear'"):
        WarmupLR(_opt(), warmup_type="cubic")


# ---------------------------------------------------------------- DeepSpeed's checks and per-group values


def _two_groups(lr0: float = 0.1, lr1: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr0},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr1},
        ]
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda o: OneCycle(o, 0.1, 1.0, cycle_first_step_size=0), "cycle_first_step_size must be a positive integer"),
        (lambda o: OneCycle(o, 0.1, 1.0, cycle_first_step_size=-3), "cycle_first_step_size"),
        (lambda o: OneCycle(o, 0.1, 1.0, cycle_second_step_size=-1), "cycle_second_step_size must be an integer >= 0"),
        (lambda o: OneCycle(o, 0.1, 1.0, decay_step_size=-1), "decay_step_size"),
        (lambda o: LRRangeTest(o, lr_range_test_step_size=0), "lr_range_test_step_size must be a positive integer"),
        (lambda o: LRRangeTest(o, lr_range_test_step_size=-5), "lr_range_test_step_size"),
        (lambda o: LRRangeTest(o, lr_range_test_min_lr=[0.1, 0.2, 0.3]), "expected 2 values"),
        (lambda o: OneCycle(o, [0.1], [1.0, 2.0]), "cycle_min_lr: expected 2 values"),
        (lambda o: OneCycle(o, 0.1, 1.0, cycle_max_mom=[0.9, 0.9, 0.9]), "cycle_max_mom: expected 2 values"),
        (lambda o: WarmupLR(o, warmup_max_lr=[1.0]), "warmup_max_lr: expected 2 values"),
    ],
)
def test_bad_step_sizes_and_group_lists_raise_value_error(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(_two_groups())


def test_warmup_lr_without_max_takes_each_groups_lr() -> None:
    """DeepSpeed's default warmup_max_lr=None: group i warms up to its own lr."""
    opt = _two_groups(0.1, 0.01)
    sched = WarmupLR(opt, warmup_num_steps=4, warmup_type="linear")
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    for _ in range(4):  # iterations 0..3: k/4 of the way
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.075, 0.0075])
    sched.step()  # iteration 4 = warmup_num_steps: each group's own lr, held from here on
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.1, 0.01])


def test_one_cycle_per_group_lists_equal_separate_schedules() -> None:
    opt = _two_groups()
    sched = OneCycle(
        opt, [0.1, 0.01], [1.0, 0.5], cycle_first_step_size=3, cycle_min_mom=[0.8, 0.7], cycle_max_mom=[0.9, 0.95]
    )
    singles = []
    for lo, hi, mlo, mhi in ((0.1, 1.0, 0.8, 0.9), (0.01, 0.5, 0.7, 0.95)):
        o = _opt()
        singles.append((o, OneCycle(o, lo, hi, cycle_first_step_size=3, cycle_min_mom=mlo, cycle_max_mom=mhi)))
    for _ in range(7):
        sched.step()
        for _o, s in singles:
            s.step()
        for group, (o, _) in zip(opt.param_groups, singles, strict=True):
            assert group["lr"] == pytest.approx(o.param_groups[0]["lr"])
            assert group["betas"] == pytest.approx(o.param_groups[0]["betas"])
    assert opt.param_groups[0]["lr"] != pytest.approx(opt.param_groups[1]["lr"])


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("name", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"])
def test_tensor_lr_stays_the_same_tensor_as_in_torch(name: str) -> None:
    """torch's schedulers fill_ a tensor lr in place (fused/capturable optimizers rely on it); ours too."""
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    params = {
        "WarmupLR": {"warmup_num_steps": 4},
        "WarmupDecayLR": {"total_num_steps": 10, "warmup_num_steps": 4},
        "WarmupCosineLR": {"total_num_steps": 10, "warmup_num_steps": 4},
        "OneCycle": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 3},
        "LRRangeTest": {"lr_range_test_step_size": 2},
    }[name]
    sched = build_scheduler(name, opt, params)
    float_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    float_sched = build_scheduler(name, float_opt, params)
    for _ in range(5):
        sched.step()
        float_sched.step()
        assert opt.param_groups[0]["lr"] is lr  # the same tensor object, updated in place
        assert lr.item() == pytest.approx(float_opt.param_groups[0]["lr"], rel=1e-6)
    last = sched.get_last_lr()[0]
    assert isinstance(last, torch.Tensor) and last is not lr  # a copy, as torch's get_last_lr returns
    # torch's own scheduler does the same with a tensor lr
    t = torch.tensor(0.1)
    topt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=t)
    torch.optim.lr_scheduler.StepLR(topt, 1, 0.5).step()
    assert topt.param_groups[0]["lr"] is t and t.item() == pytest.approx(0.05)
