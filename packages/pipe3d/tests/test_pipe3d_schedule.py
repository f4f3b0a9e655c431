"""Schedules as data: order, activation bounds, deadlock-freedom and the bubble, without processes."""

from __future__ import annotations

import pytest

from pipe3d import GPipe, Interleaved1F1B, OneFOneB, bubble_formula, make_schedule
from pipe3d.schedule import Backward, Forward, InferenceSchedule, RecvActivation, SendActivation, simulate

CONFIGS = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 4, 8)]


def _schedules(p: int, m: int) -> list:
    out = [GPipe(m, p), OneFOneB(m, p)]
    if m % p == 0:
        out += [Interleaved1F1B(m, p, 2), Interleaved1F1B(m, p, 3)]
    return out


@pytest.mark.parametrize(("p", "m"), CONFIGS)
def test_every_forward_precedes_its_backward_and_each_runs_once(p: int, m: int) -> None:
    for sched in _schedules(p, m):
        for stage in range(p):
            order = sched.compute_order(stage)
            fwd = [(i.micro_batch, i.chunk) for i in order if isinstance(i, Forward)]
            bwd = [(i.micro_batch, i.chunk) for i in order if isinstance(i, Backward)]
            units = {(mb, c) for mb in range(m) for c in range(sched.chunks)}
            assert sorted(fwd) == sorted(units) and sorted(bwd) == sorted(units), (sched, stage)
            pos = {(type(i), i.micro_batch, i.chunk): k for k, i in enumerate(order)}
            for u in units:
                assert pos[(Forward, *u)] < pos[(Backward, *u)], (sched, stage, u)


@pytest.mark.parametrize(("p", "m"), CONFIGS)
def test_live_activations_stay_within_the_bound(p: int, m: int) -> None:
    for sched in _schedules(p, m):
        for stage in range(p):
            assert sched.max_live_activations(stage) <= sched.activation_bound(stage), (sched, stage)
    for stage in range(p):
        assert OneFOneB(m, p).max_live_activations(stage) <= min(p, m)
        assert GPipe(m, p).max_live_activations(stage) == m
    if m > p:
        # 1F1B's point: the first stage holds p micro-batches, not m.
        assert OneFOneB(m, p).max_live_activations(0) == p


@pytest.mark.parametrize(("p", "m"), CONFIGS)
def test_simulation_has_no_deadlock_and_the_formula_bubble(p: int, m: int) -> None:
    for sched in _schedules(p, m):
        result = simulate(sched)
        assert result.bubble == pytest.approx(bubble_formula(p, m, sched.chunks), abs=1e-9), sched
    assert simulate(InferenceSchedule(m, p, 1)).makespan > 0


def test_simulation_at_unequal_stage_times() -> None:
    # GPipe, 2 stages, 4 micro-batches, the second stage twice as slow: worked by hand, stage 0 ends
    # at 18 (busy 8), stage 1 at 17 (busy 16).
    result = simulate(GPipe(4, 2), forward_time=[1.0, 2.0], backward_time=[1.0, 2.0])
    assert result.makespan == 18.0 and result.busy == [8.0, 16.0] and result.ends == [18.0, 17.0]
    assert result.stage_bubble == pytest.approx(((1 - 8 / 18) + (1 - 16 / 17)) / 2)
    # Equal times given per virtual stage are the scalar case.
    sched = Interleaved1F1B(4, 2, 2)
    assert simulate(sched, [0.5] * 4, [0.5] * 4).makespan == simulate(sched).makespan
    with pytest.raises(ValueError, match="one time per virtual stage"):
        simulate(sched, [1.0, 1.0])


def test_sends_and_receives_pair_up() -> None:
    sched = Interleaved1F1B(4, 2, 2)
    steps = sched.steps(0)
    # Stage 0 receives chunk 1's input from the last stage, never chunk 0's (it loads data).
    assert not any(isinstance(i, RecvActivation) and i.chunk == 0 for i in steps)
    assert sum(isinstance(i, SendActivation) for i in steps) == 2 * 4
    # The last virtual stage sends no activation.
    assert not any(isinstance(i, SendActivation) and i.chunk == 1 for i in sched.steps(1))


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of the pipeline stages"):
        Interleaved1F1B(3, 2, 2)
    with pytest.raises(ValueError, match="accepted: 'gpipe', '1f1b', 'interleaved'"):
        make_schedule("zigzag", 4, 2)
    with pytest.raises(ValueError, match="use 'interleaved'"):
        make_schedule("1f1b", 4, 2, chunks=2)
    with pytest.raises(ValueError, match=">= 1"):
        GPipe(0, 2)
