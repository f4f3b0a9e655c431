"""A progress bar for training loops (tqdm): step, loss, lr, throughput and ETA.

    with ProgressBar(total=num_steps) as bar:
        for step in range(num_steps):
            loss = engine.train_batch(...)
            bar.update(loss=loss, lr=engine.get_lr()[0], samples_per_sec=tput.avg_samples_per_sec())

It is silent on non-zero ranks, and off when the output is not a terminal (log files, CI)
unless ``enable=True`` asks for it.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

__all__ = ["ProgressBar"]


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value}"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


class ProgressBar:
    """tqdm bar over training steps with the latest metrics as its postfix.

    Args:
        total: number of steps (None: unknown, no ETA).
        desc: label at the left.
        rank: this process's rank (default: :func:`ds_monitor.get_rank`); only rank 0 shows a bar.
        enable: True forces the bar on rank 0, False turns it off, None shows it only on a TTY.
        file: stream to draw on (default ``sys.stderr``).
        initial: the step to start counting from (on resume).
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "train",
        rank: int | None = None,
        enable: bool | None = None,
        file: TextIO | None = None,
        initial: int = 0,
        **tqdm_kwargs: Any,
    ) -> None:
        from ds_monitor.monitors import get_rank

        self.file = file if file is not None else sys.stderr
        rank = get_rank() if rank is None else rank
        if enable is None:
            isatty = getattr(self.file, "isatty", None)
            enable = bool(isatty and isatty())
        self.enabled = rank == 0 and enable
        self.step = initial
        self.postfix: dict[str, str] = {}
        self._bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=desc, initial=initial, file=self.file, unit="step", dynamic_ncols=True, **tqdm_kwargs
            )

    def update(
        self,
        n: int = 1,
        loss: float | None = None,
        lr: float | None = None,
        samples_per_sec: float | None = None,
        tokens_per_sec: float | None = None,
        **extra: float,
    ) -> None:
        """Advance ``n`` steps and show the given figures (tensors are fine: ``.item()`` is called)."""
        self.step += n
        if not self.enabled:
            return
        figures = {"loss": loss, "lr": lr, "samples/s": samples_per_sec, "tokens/s": tokens_per_sec, **extra}
        for key, value in figures.items():
            if value is None:
                continue
            if hasattr(value, "item"):
                value = value.item()
            self.postfix[key] = _fmt(float(value))
        assert self._bar is not None
        self._bar.set_postfix(self.postfix, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line above the bar (nothing when the bar is off)."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
