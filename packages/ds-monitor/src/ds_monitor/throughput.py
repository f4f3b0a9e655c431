"""Throughput: samples/s, tokens/s and model TFLOPS of training steps.

:class:`ThroughputTimer` follows DeepSpeed's: ``start()`` before a micro-step, ``stop(global_step=...)``
after it; the first ``start_step`` global steps are warm-up and not counted; the time between
``stop()`` and the next ``start()`` (data loading) is not counted either.

    samples/s = batch_size × counted global steps / counted seconds
    tokens/s  = samples/s × seq_length
    TFLOPS    = flops_per_step × counted global steps / counted seconds / 1e12

``batch_size`` is the global batch (``train_batch_size``, every rank's samples together), so these
are whole-job figures; :attr:`ThroughputTimer.tflops_per_device` divides by ``world_size``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ds_monitor.timers import synchronize_device

__all__ = ["ThroughputTimer"]


class ThroughputTimer:
    """Samples/s, tokens/s and TFLOPS over training steps.

    Args:
        batch_size: samples per global step (all ranks together).
        start_step: global steps to skip before counting (warm-up), DeepSpeed's default 2.
        steps_per_output: report every this many global steps through ``logging_fn`` (None: never).
        seq_length: tokens per sample, for tokens/s (None: not reported).
        flops_per_step: FLOPs of one global step (all ranks), for TFLOPS; see :mod:`ds_monitor.flops`.
        world_size: devices sharing the step, for the per-device TFLOPS.
        synchronize: wait for the accelerator before reading the clock.
        monitor_memory: add memory stats to the report.
        logging_fn: where reports go (default ``print``), called on rank 0 only.
        enabled: False makes every call a no-op.
        clock: seconds source (tests pass a fake one).
    """

    def __init__(
        self,
        batch_size: int,
        start_step: int = 2,
        steps_per_output: int | None = None,
        seq_length: int | None = None,
        flops_per_step: float | None = None,
        world_size: int = 1,
        synchronize: bool = True,
        monitor_memory: bool = False,
        logging_fn: Callable[[str], None] | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if batch_size is None or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if steps_per_output is not None and steps_per_output <= 0:
            raise ValueError(f"steps_per_output must be a positive integer or None, got {steps_per_output}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if world_size <= 0:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.batch_size = batch_size
        self.start_step = start_step
        self.steps_per_output = steps_per_output
        self.seq_length = seq_length
        self.flops_per_step = flops_per_step
        self.world_size = world_size
        self.synchronize = synchronize
        self.monitor_memory = monitor_memory
        self.logging_fn = logging_fn or print
        self.enabled = enabled
        self._clock = clock

        self.epoch_count = 0
        self.micro_step_count = 0
        self.global_step_count = 0
        self.total_elapsed_time = 0.0
        """Seconds counted towards the averages."""
        self.step_elapsed_time = 0.0
        """Seconds of the current global step so far."""
        self.last_step_time = 0.0
        """Seconds of the last completed, counted global step."""
        self._counted_steps = 0
        self._start_time: float | None = None
        self._started = False

    def _now(self) -> float:
        if self.synchronize:
            synchronize_device()
        return self._clock()

    def update_epoch_count(self) -> None:
        """A new epoch begins."""
        self.epoch_count += 1
        self.micro_step_count = 0

    def start(self) -> None:
        """Before a micro-step."""
        if not self.enabled:
            return
        self._started = True
        self._start_time = self._now() if self.global_step_count >= self.start_step else None

    def stop(self, global_step: bool = False, report_speed: bool = True) -> None:
        """After a micro-step; ``global_step=True`` when it ended a global step (the optimizer stepped)."""
        if not self.enabled or not self._started:
            return
        self._started = False
        self.micro_step_count += 1
        if self._start_time is not None:
            duration = self._now() - self._start_time
            self.total_elapsed_time += duration
            self.step_elapsed_time += duration
        if global_step:
            self.global_step_count += 1
            if self._start_time is not None:
                self._counted_steps += 1
                self.last_step_time = self.step_elapsed_time
                if report_speed and self.steps_per_output and self.global_step_count % self.steps_per_output == 0:
                    self._report()
            self.step_elapsed_time = 0.0
        self._start_time = None

    @property
    def counted_steps(self) -> int:
        """Global steps included in the averages (after warm-up)."""
        return self._counted_steps

    def avg_samples_per_sec(self) -> float:
        """Average samples/s over the counted steps (``-inf`` before any, as DeepSpeed)."""
        if self._counted_steps == 0 or self.total_elapsed_time <= 0:
            return float("-inf")
        return self.batch_size * self._counted_steps / self.total_elapsed_time

    def curr_samples_per_sec(self) -> float:
        """Samples/s of the last counted global step."""
        return self.batch_size / self.last_step_time if self.last_step_time > 0 else float("-inf")

    def avg_tokens_per_sec(self) -> float | None:
        """Average tokens/s (None without ``seq_length``)."""
        if self.seq_length is None:
            return None
        return self.avg_samples_per_sec() * self.seq_length

    def avg_tflops(self) -> float | None:
        """Model TFLOPS of the whole job (None without ``flops_per_step``)."""
        if self.flops_per_step is None or self._counted_steps == 0 or self.total_elapsed_time <= 0:
            return None
        return self.flops_per_step * self._counted_steps / self.total_elapsed_time / 1e12

    @property
    def tflops_per_device(self) -> float | None:
        """:meth:`avg_tflops` divided by ``world_size``."""
        tflops = self.avg_tflops()
        return None if tflops is None else tflops / self.world_size

    def summary(self) -> dict[str, float]:
        """The current figures by name (only those that are defined)."""
        out = {"samples_per_sec": self.avg_samples_per_sec()}
        if self.last_step_time > 0:
            out["curr_samples_per_sec"] = self.curr_samples_per_sec()
        tokens = self.avg_tokens_per_sec()
        if tokens is not None:
            out["tokens_per_sec"] = tokens
        tflops = self.avg_tflops()
        if tflops is not None:
            out["tflops"] = tflops
            out["tflops_per_device"] = tflops / self.world_size
        return out

    def events(self, step: int, prefix: str = "Train/Samples/") -> list[tuple[str, float, int]]:
        """Monitor events for the figures (nothing before the first counted step)."""
        if self._counted_steps == 0:
            return []
        return [(prefix + name, value, step) for name, value in self.summary().items()]

    def _report(self) -> None:
        from ds_monitor.monitors import get_rank

        if get_rank() != 0:
            return
        parts = [
            f"epoch={self.epoch_count}/micro_step={self.micro_step_count}/global_step={self.global_step_count}",
            f"RunningAvgSamplesPerSec={self.avg_samples_per_sec():.3f}",
            f"CurrSamplesPerSec={self.curr_samples_per_sec():.3f}",
        ]
        tokens = self.avg_tokens_per_sec()
        if tokens is not None:
            parts.append(f"TokensPerSec={tokens:.1f}")
        tflops = self.avg_tflops()
        if tflops is not None:
            parts.append(f"TFLOPS={tflops:.3f} ({tflops / self.world_size:.3f}/device)")
        if self.monitor_memory:
            from ds_monitor.memory import format_memory_stats

            parts.append(format_memory_stats())
        self.logging_fn(", ".join(parts))
