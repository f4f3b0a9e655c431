"""Wall-clock timers and the throughput timer: sane values, and the arithmetic checked with a fake clock."""

from __future__ import annotations

import time

import pytest

from ds_monitor import ThroughputTimer, Timers, dense_transformer_flops
from ds_monitor.timers import BREAKDOWN


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_real_timers_are_sane_and_monotonic() -> None:
    timers = Timers(synchronize=True)
    totals = []
    for _ in range(3):
        timers("forward").start()
        time.sleep(0.01)
        timers("forward").stop()
        totals.append(timers("forward").elapsed(reset=False))
    assert totals == sorted(totals), "accumulated time must not go backwards"
    assert 30.0 <= totals[-1] < 3000.0  # three sleeps of 10 ms, generous upper bound for a busy machine
    assert timers("forward").count == 3
    assert 10.0 <= timers("forward").mean() <= totals[-1]
    assert timers.elapsed_ms(["forward"])["forward"] == pytest.approx(totals[-1])
    assert timers("forward").count == 0  # reset by default


def test_breakdown_log_line_and_events() -> None:
    clock = FakeClock()
    timers = Timers(synchronize=False, clock=clock)
    for name, seconds in zip(BREAKDOWN, (0.010, 0.020, 0.015, 0.005, 0.003), strict=True):
        timers(name).start()
        clock.advance(seconds)
        timers(name).stop()
    lines: list[str] = []
    line = timers.log(list(BREAKDOWN), normalizer=2.0, reset=False, print_fn=lines.append)
    assert line == (
        "time (ms) | forward: 5.00 | backward: 10.00 | backward_inner: 7.50 | backward_allreduce: 2.50 | step: 1.50"
    )
    assert lines == [line]
    events = dict((name, value) for name, value, _ in timers.events(["forward", "missing"], step=64))
    assert events == {"Train/Samples/elapsed_time_ms_forward": pytest.approx(10.0)}


def test_elapsed_counts_a_running_interval_and_keeps_it_running() -> None:
    clock = FakeClock()
    timer = Timers(synchronize=False, clock=clock)("step")
    timer.start()
    clock.advance(0.5)
    assert timer.elapsed(reset=False) == pytest.approx(500.0)
    assert timer.started
    clock.advance(0.25)
    assert timer.stop() == pytest.approx(250.0)


def test_timer_misuse_is_an_error_and_disabled_timers_do_nothing() -> None:
    timers = Timers()
    with pytest.raises(RuntimeError, match="'forward' was stopped without being started"):
        timers("forward").stop()
    timers("forward").start()
    with pytest.raises(RuntimeError, match="'forward' is already running"):
        timers("forward").start()
    off = Timers(enabled=False)
    off("forward").start()
    off("forward").start()
    off("forward").stop()
    assert off.elapsed_ms(["forward"]) == {"forward": 0.0}
    with pytest.raises(ValueError, match="normalizer"):
        timers.elapsed_ms(["forward"], normalizer=0)


def test_throughput_matches_the_arithmetic() -> None:
    clock = FakeClock()
    params, seq, batch = 1_000_000, 128, 32
    flops = dense_transformer_flops(params, batch * seq)
    assert flops == 6 * params * batch * seq
    reports: list[str] = []
    tput = ThroughputTimer(
        batch_size=batch,
        start_step=2,
        steps_per_output=4,
        seq_length=seq,
        flops_per_step=flops,
        world_size=2,
        synchronize=False,
        logging_fn=reports.append,
        clock=clock,
    )
    durations = [9.0, 9.0, 0.5, 0.5, 0.25, 0.75]  # the first two are warm-up and not counted
    for seconds in durations:
        for micro in range(2):  # two micro-steps per global step, 1 s of data loading between
            tput.start()
            clock.advance(seconds / 2)
            tput.stop(global_step=micro == 1)
            clock.advance(1.0)
    assert tput.global_step_count == 6 and tput.micro_step_count == 12 and tput.counted_steps == 4
    counted = sum(durations[2:])  # 2.0 s for 4 steps
    assert tput.avg_samples_per_sec() == pytest.approx(batch * 4 / counted)
    assert tput.curr_samples_per_sec() == pytest.approx(batch / 0.75)
    assert tput.avg_tokens_per_sec() == pytest.approx(batch * 4 / counted * seq)
    assert tput.avg_tflops() == pytest.approx(flops * 4 / counted / 1e12)
    assert tput.tflops_per_device == pytest.approx(flops * 4 / counted / 1e12 / 2)
    assert len(reports) == 1 and "global_step=4" in reports[0] and "RunningAvgSamplesPerSec=" in reports[0]
    names = {name for name, _, step in tput.events(step=192)}
    assert names == {
        "Train/Samples/samples_per_sec",
        "Train/Samples/curr_samples_per_sec",
        "Train/Samples/tokens_per_sec",
        "Train/Samples/tflops",
        "Train/Samples/tflops_per_device",
    }


def test_throughput_before_counting_and_bad_arguments() -> None:
    tput = ThroughputTimer(batch_size=4, synchronize=False)
    assert tput.avg_samples_per_sec() == float("-inf") and tput.events(step=0) == []
    assert tput.avg_tflops() is None and tput.avg_tokens_per_sec() is None
    with pytest.raises(ValueError, match="batch_size"):
        ThroughputTimer(batch_size=0)
    with pytest.raises(ValueError, match="steps_per_output"):
        ThroughputTimer(batch_size=1, steps_per_output=0)
