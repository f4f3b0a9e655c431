"""DynamicLossScaler / StaticLossScaler follow DeepSpeed's update rules step for step.

The expected trajectories below were written by hand from DeepSpeed's documented semantics
(deepspeed/runtime/fp16/loss_scaler.py, DynamicLossScaler.update_scale):
- overflow: if hysteresis == 1 or cur_hysteresis == 1: scale = max(scale / 2, min_scale)
  (raise when already at min_scale and raise_error_at_min_scale); else cur_hysteresis -= 1;
  last_overflow_iter = cur_iter.
- clean step: consecutive_hysteresis refills cur_hysteresis; with
  stable = cur_iter - last_overflow_iter - 1, if stable > 0 and stable % window == 0 the
  scale doubles (and without consecutive_hysteresis the hysteresis is refilled then).
- cur_iter += 1 every call.
"""

from __future__ import annotations

import json

import pytest
import torch

from amp_scaler import (
    DynamicLossScaler,
    LossScaleUnderflowError,
    StaticLossScaler,
    create_loss_scaler,
    parse_fp16,
)


def run(scaler: DynamicLossScaler, pattern: str) -> tuple[list[float], list[int]]:
    """Feed 'O' (overflow) / 'C' (clean) steps; return the scale and hysteresis after each."""
    scales, hyst = [], []
    for ch in pattern:
        scaler.update_scale(ch == "O")
        scales.append(scaler.loss_scale)
        hyst.append(scaler.cur_hysteresis)
    return scales, hyst


PATTERN = "CCCOOCOCCCOCCCCC"


def test_hysteresis_2_window_2_not_consecutive() -> None:
    s = DynamicLossScaler(init_scale=16, scale_window=2, hysteresis=2, consecutive_hysteresis=False)
    scales, hyst = run(s, PATTERN)
    assert scales == [16, 16, 32, 32, 16, 16, 8, 8, 8, 16, 16, 16, 16, 32, 32, 64]
    assert hyst == [2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 2, 2, 2]
    assert s.skipped_steps == PATTERN.count("O")
    assert s.cur_iter == len(PATTERN)
    assert s.last_overflow_iter == 10


def test_hysteresis_2_window_2_consecutive() -> None:
    s = DynamicLossScaler(init_scale=16, scale_window=2, hysteresis=2, consecutive_hysteresis=True)
    scales, hyst = run(s, PATTERN)
    # A clean step between two overflows refills the hysteresis, so step 6 does not halve.
    assert scales == [16, 16, 32, 32, 16, 16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 128]
    assert hyst == [2, 2, 2, 1, 1, 2, 1, 2, 2, 2, 1, 2, 2, 2, 2, 2]


def test_hysteresis_1_window_3_floor_without_error() -> None:
    s = DynamicLossScaler(init_scale=8, scale_window=3, hysteresis=1, min_scale=2, raise_error_at_min_scale=False)
    scales, _ = run(s, "OOOCCCCOCCCCCCC")
    assert scales == [4, 2, 2, 2, 2, 2, 4, 2, 2, 2, 2, 4, 4, 4, 8]


def test_hysteresis_3_alternating() -> None:
    # Not consecutive: clean steps between overflows do not refill, the third overflow halves.
    s = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, hysteresis=3)
    scales, hyst = run(s, "OCOCOCO")
    assert scales == [65536, 65536, 65536, 65536, 32768, 32768, 16384]
    assert hyst == [2, 2, 1, 1, 1, 1, 1]
    # Consecutive: every clean step refills, alternating overflows never halve.
    s = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, hysteresis=3, consecutive_hysteresis=True)
    scales, hyst = run(s, "OCOCOCO")
    assert scales == [65536] * 7
    assert hyst == [2, 3, 2, 3, 2, 3, 2]


def test_first_growth_after_window_plus_one_clean_steps() -> None:
    s = DynamicLossScaler(init_scale=1024, scale_window=1000)
    for _ in range(1000):
        s.update_scale(False)
    assert s.loss_scale == 1024  # DeepSpeed grows on the (window + 1)-th clean step from the start
    s.update_scale(False)
    assert s.loss_scale == 2048
    for _ in range(999):
        s.update_scale(False)
    assert s.loss_scale == 2048
    s.update_scale(False)
    assert s.loss_scale == 4096  # then every `window` clean steps


def test_window_counts_from_last_overflow() -> None:
    s = DynamicLossScaler(init_scale=64, scale_window=4, hysteresis=1)
    scales, _ = run(s, "CCO" + "C" * 9)
    # Overflow at iter 2 -> 32; clean iters 3..: stable = iter - 2 - 1, grows at stable 4 and 8 (iters 7, 11).
    assert scales == [64, 64, 32, 32, 32, 32, 32, 64, 64, 64, 64, 128]


def test_raises_at_min_scale() -> None:
    s = DynamicLossScaler(init_scale=8, hysteresis=1, min_scale=3)
    s.update_scale(True)
    assert s.loss_scale == 4
    s.update_scale(True)
    assert s.loss_scale == 3  # max(4 / 2, min_scale)
    with pytest.raises(LossScaleUnderflowError, match="min_loss_scale"):
        s.update_scale(True)


def test_raise_waits_for_hysteresis() -> None:
    s = DynamicLossScaler(init_scale=1, hysteresis=2, min_scale=1)
    s.update_scale(True)  # hysteresis absorbs it
    assert (s.loss_scale, s.cur_hysteresis) == (1, 1)
    with pytest.raises(LossScaleUnderflowError):
        s.update_scale(True)


def test_state_dict_round_trip_is_json_and_continues_identically() -> None:
    a = DynamicLossScaler(init_scale=32, scale_window=3, hysteresis=2)
    run(a, "COCCO")
    state = json.loads(json.dumps(a.state_dict()))
    b = DynamicLossScaler(init_scale=32, scale_window=3, hysteresis=2)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert run(a, "CCCCCCOCC") == run(b, "CCCCCCOCC")
    with pytest.raises(ValueError, match="not a loss-scaler state"):
        b.load_state_dict({"foo": 1})


def test_static_scaler() -> None:
    s = StaticLossScaler(128.0)
    loss = torch.tensor(2.0)
    assert s.scale_loss(loss).item() == 256.0
    s.update_scale(True)
    s.update_scale(False)
    assert s.loss_scale == 128.0 and s.skipped_steps == 1
    assert s.has_overflow([torch.tensor([1.0, float("inf")])])
    t = StaticLossScaler(128.0)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.skipped_steps == 1
    with pytest.raises(ValueError, match="scale"):
        StaticLossScaler(0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_has_overflow(dtype: torch.dtype, device: torch.device) -> None:
    s = DynamicLossScaler()
    ok = [torch.randn(5).to(dtype), None, torch.empty(0, dtype=dtype), torch.full((3,), 6e4).to(dtype)]
    ok = [t if t is None else t.to(device) for t in ok]
    assert not s.has_overflow(ok)
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.randn(7).to(dtype).to(device)
        t[3] = bad
        assert s.has_overflow([*ok, t]), bad


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="scale_window"):
        DynamicLossScaler(scale_window=0)
    with pytest.raises(ValueError, match="hysteresis"):
        DynamicLossScaler(hysteresis=0)
    with pytest.raises(ValueError, match="min_scale"):
        DynamicLossScaler(min_scale=-1)


def test_create_loss_scaler_from_config() -> None:
    assert type(create_loss_scaler(None)) is StaticLossScaler
    assert create_loss_scaler(parse_fp16({"enabled": False})).loss_scale == 1.0
    st = create_loss_scaler(parse_fp16({"enabled": True, "loss_scale": 512}))
    assert type(st) is StaticLossScaler and st.loss_scale == 512
    dyn = create_loss_scaler(
        parse_fp16(
            {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": 12,
                "loss_scale_window": 7,
                "hysteresis": 3,
                "consecutive_hysteresis": True,
                "min_loss_scale": 4,
            }
        )
    )
    assert isinstance(dyn, DynamicLossScaler)
    assert (dyn.loss_scale, dyn.scale_window, dyn.delayed_shift, dyn.consecutive_hysteresis, dyn.min_scale) == (
        4096,
        7,
        3,
        True,
        4,
    )
    with pytest.raises(ValueError, match="auto"):
        create_loss_scaler(parse_fp16({"enabled": "auto"}))
