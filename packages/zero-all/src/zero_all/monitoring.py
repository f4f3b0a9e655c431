"""What the engine reports: the step line every ``steps_per_print`` steps, ds-monitor events, timers.

Events follow DeepSpeed's names (``Train/Samples/train_loss``, ``lr``, ``loss_scale``,
``grad_norm``, ``samples_per_sec``), logged against the number of samples seen, as DeepSpeed
does; unlike DeepSpeed the training loss is written too (DEEPSPEED_NOTES.md).
"""

from __future__ import annotations

from ds_monitor import MonitorMaster, ThroughputTimer, Timers, tags
from zero_all.config.batch import BatchSizes
from zero_all.config.model import ZeroAllConfig

__all__ = ["EngineMonitor"]


class EngineMonitor:
    """Printing, monitors and timers for one engine (writes on rank 0 only)."""

    def __init__(self, config: ZeroAllConfig, batch: BatchSizes, rank: int, world_size: int) -> None:
        self.rank = rank
        self.steps_per_print = config.steps_per_print
        self.wall_clock_breakdown = config.wall_clock_breakdown
        self.master = MonitorMaster(config.tensorboard, config.csv_monitor, config.wandb, config.comet, rank=rank)
        self.timers = Timers(synchronize=False, enabled=config.wall_clock_breakdown)
        self.throughput = ThroughputTimer(
            batch.train_batch_size, steps_per_output=None, world_size=world_size, synchronize=False
        )
        self._timing = False

    def wants_loss(self, step: int) -> bool:
        """Whether step ``step`` prints or writes events (the loss is only read from the device then)."""
        return self.master.enabled or bool(self.steps_per_print and step % self.steps_per_print == 0)

    def timers_start(self, name: str) -> None:
        """Start a wall-clock timer (no-op unless ``wall_clock_breakdown``); the first one starts the throughput clock."""
        if not self._timing:
            self.throughput.start()
            self._timing = True
        self.timers(name).start()

    def timers_stop(self, name: str) -> None:
        """Stop a wall-clock timer."""
        self.timers(name).stop()

    def after_step(
        self,
        *,
        step: int,
        samples: int,
        loss: float | None,
        lr: list[float],
        loss_scale: float,
        grad_norm: float | None,
        skipped: int,
    ) -> None:
        """Called after every optimizer step (all ranks)."""
        if self._timing:
            self.throughput.stop(global_step=True, report_speed=False)
            self._timing = False
        if self.master.enabled:
            events: list[tuple[str, float, int]] = [(tags.LR, lr[0], samples), (tags.LOSS_SCALE, loss_scale, samples)]
            if loss is not None:
                events.append((tags.TRAIN_LOSS, loss, samples))
            if grad_norm is not None:
                events.append((tags.GRAD_NORM, grad_norm, samples))
            if self.throughput.counted_steps > 0:
                events.append((tags.SAMPLES_PER_SEC, self.throughput.avg_samples_per_sec(), samples))
            self.master.write_events(events)
        if self.steps_per_print and step % self.steps_per_print == 0:
            if self.rank == 0:
                parts = [f"step={step}", f"skipped={skipped}", f"lr={lr[0]:.6g}"]
                if loss is not None:
                    parts.append(f"loss={loss:.4f}")
                if grad_norm is not None:
                    parts.append(f"grad_norm={grad_norm:.4f}")
                if self.throughput.counted_steps > 0:
                    parts.append(f"samples/s={self.throughput.avg_samples_per_sec():.1f}")
                print("[zero-all] " + ", ".join(parts), flush=True)
            if self.wall_clock_breakdown:
                self.timers.log(["forward", "backward", "step"], ranks=(0,))

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        """Write the script's own ``(name, value, step)`` events (DeepSpeed's ``engine.monitor.write_events``)."""
        if self.master.enabled:
            self.master.write_events(events)

    def close(self) -> None:
        """Flush and close the monitors."""
        self.master.close()
