"""Named wall-clock timers for the ``wall_clock_breakdown`` report.

``timers = Timers(synchronize=True)``; ``timers("forward").start()`` ... ``.stop()``; every
``steps_per_print`` steps ``timers.log(["forward", "backward", "step"])`` prints
``time (ms) | forward: 12.31 | backward: 25.02 | step: 3.40`` on rank 0 and resets them.

Timers read ``time.perf_counter`` (monotonic). With ``synchronize=True`` they wait for the
accelerator (``torch.accelerator.synchronize()``) before reading the clock, so queued device work
is counted where it was launched; on CPU there is nothing to wait for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

__all__ = [
    "BACKWARD",
    "BACKWARD_ALLREDUCE",
    "BACKWARD_INNER",
    "FORWARD",
    "STEP",
    "Timer",
    "Timers",
    "synchronize_device",
]

FORWARD = "forward"
BACKWARD = "backward"
BACKWARD_INNER = "backward_inner"
BACKWARD_ALLREDUCE = "backward_allreduce"
STEP = "step"
BREAKDOWN = (FORWARD, BACKWARD, BACKWARD_INNER, BACKWARD_ALLREDUCE, STEP)
"""The timers of DeepSpeed's wall-clock breakdown, in report order."""


def synchronize_device() -> None:
    """Wait for queued work on the current accelerator, if there is one (no-op on CPU)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        accelerator.synchronize()
    elif torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """One named timer that adds up start/stop intervals until reset. Times are in milliseconds."""

    def __init__(
        self,
        name: str,
        synchronize: bool = True,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.synchronize = synchronize
        self.enabled = enabled
        self._clock = clock
        self._start: float | None = None
        self.records_ms: list[float] = []

    @property
    def started(self) -> bool:
        """True between start() and stop()."""
        return self._start is not None

    def _now(self) -> float:
        if self.synchronize:
            synchronize_device()
        return self._clock()

    def start(self) -> None:
        """Start an interval. Starting a running timer is an error (a missing stop())."""
        if not self.enabled:
            return
        if self._start is not None:
            raise RuntimeError(f"timer {self.name!r} is already running")
        self._start = self._now()

    def stop(self) -> float:
        """End the interval; returns its length in ms."""
        if not self.enabled:
            return 0.0
        if self._start is None:
            raise RuntimeError(f"timer {self.name!r} was stopped without being started")
        elapsed = (self._now() - self._start) * 1000.0
        self._start = None
        self.records_ms.append(elapsed)
        return elapsed

    def reset(self) -> None:
        """Forget all intervals (and a running one)."""
        self._start = None
        self.records_ms.clear()

    def elapsed(self, reset: bool = True) -> float:
        """Total ms of the recorded intervals, counting a running interval up to now (it keeps running)."""
        running = self._start is not None
        if running:
            self.stop()
        total = sum(self.records_ms)
        if reset:
            self.reset()
        if running:
            self.start()
        return total

    def mean(self, trim: float = 0.1) -> float:
        """Mean ms per interval, dropping the ``trim`` fraction of lowest and highest (DeepSpeed's trimmed mean)."""
        data = sorted(self.records_ms)
        if not data:
            return 0.0
        k = round(len(data) * trim)
        kept = data[k : len(data) - k] or data
        return sum(kept) / len(kept)

    @property
    def count(self) -> int:
        """Number of recorded intervals."""
        return len(self.records_ms)


class Timers:
    """A group of named timers created on first use: ``timers("forward").start()``.

    ``enabled=False`` makes every timer a no-op (what the engine uses when ``wall_clock_breakdown``
    is off), so call sites need no ``if``.
    """

    def __init__(
        self,
        synchronize: bool = True,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.synchronize = synchronize
        self.enabled = enabled
        self._clock = clock
        self.timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        timer = self.timers.get(name)
        if timer is None:
            timer = self.timers[name] = Timer(name, self.synchronize, self.enabled, self._clock)
        return timer

    def __contains__(self, name: str) -> bool:
        return name in self.timers

    def elapsed_ms(self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True) -> dict[str, float]:
        """Total ms per existing timer, divided by ``normalizer`` (e.g. the number of micro-steps)."""
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        return {name: self.timers[name].elapsed(reset=reset) / normalizer for name in names if name in self.timers}

    def get_mean(self, names: Iterable[str], normalizer: float = 1.0, reset: bool = True) -> dict[str, float]:
        """Trimmed mean ms per interval for each existing timer, divided by ``normalizer``."""
        if normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        means = {}
        for name in names:
            if name in self.timers:
                means[name] = self.timers[name].mean() / normalizer
                if reset:
                    self.timers[name].reset()
        return means

    def log(
        self,
        names: Iterable[str],
        normalizer: float = 1.0,
        reset: bool = True,
        memory_breakdown: bool = False,
        ranks: Iterable[int] | None = (0,),
        print_fn: Callable[[str], None] = print,
    ) -> str:
        """Print ``time (ms) | name: value | ...`` on ``ranks`` (None: every rank) and return the line."""
        line = "time (ms)" + "".join(
            f" | {name}: {ms:.2f}" for name, ms in self.elapsed_ms(names, normalizer, reset).items()
        )
        if memory_breakdown:
            from ds_monitor.memory import format_memory_stats

            line += " | " + format_memory_stats()
        from ds_monitor.monitors import get_rank

        if ranks is None or get_rank() in set(ranks):
            print_fn(line)
        return line

    def events(
        self,
        names: Iterable[str],
        step: int,
        normalizer: float = 1.0,
        reset: bool = True,
        prefix: str = "Train/Samples/",
    ) -> list[tuple[str, float, int]]:
        """Monitor events ``(prefix + "elapsed_time_ms_" + name, ms, step)`` (DeepSpeed's tags)."""
        return [
            (f"{prefix}elapsed_time_ms_{name}", ms, step)
            for name, ms in self.elapsed_ms(names, normalizer, reset).items()
        ]
