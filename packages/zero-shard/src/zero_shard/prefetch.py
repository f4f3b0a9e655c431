"""The recorded order in which stage-3 units are fetched, and what to fetch ahead of use.

Plain data, no collectives, so a test can drive it by hand. One *iteration* is what happens between two
forwards of the root module (its forward and, when training, its backward). The trace of the previous
iteration predicts the current one while the two agree; at the first disagreement (a layer skipped this
step, a branch taken) prediction stops for the rest of the iteration and the new order is recorded for
the next one.

[Note: a prediction must be the same on every rank] A prefetch launches collectives, which every rank
must issue in the same order. The prediction depends only on the sequence of fetch requests, and each
on-demand fetch first checks that every rank requests the same unit (:mod:`zero_shard.stage3`), so ranks
that got this far agree on the sequence and therefore on the prediction.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ExecutionTrace"]


class ExecutionTrace:
    """Records unit fetch order per iteration and predicts upcoming units from the last complete one."""

    def __init__(self) -> None:
        self.recorded: list[int] | None = None
        self.current: list[int] = []
        self.on_track = False
        self.iterations = 0
        self.invalidations = 0

    def start_iteration(self) -> None:
        """A new forward of the root module begins: keep the last order if it was followed, else adopt it."""
        if self.current and (self.recorded is None or not self.on_track or len(self.current) != len(self.recorded)):
            if self.recorded is not None:
                self.invalidations += 1
            self.recorded = list(self.current)
        self.current = []
        self.on_track = self.recorded is not None
        self.iterations += 1

    def observe(self, unit: int) -> None:
        """A unit was requested (by a module's forward or backward)."""
        pos = len(self.current)
        self.current.append(unit)
        if self.on_track and (self.recorded is None or pos >= len(self.recorded) or self.recorded[pos] != unit):
            self.on_track = False

    def upcoming(self, numel: Callable[[int], int], budget: int, skip: int = 0) -> list[int]:
        """The next predicted units, in order, whose sizes sum to at most ``budget`` elements.

        At least one unit when ``budget`` > 0, however large (DeepSpeed prefetches the next parameter
        even when it alone exceeds ``stage3_prefetch_bucket_size``). ``skip``: leave out the first ``skip``
        distinct upcoming units (the window after a window already taken).
        """
        if not self.on_track or self.recorded is None or budget <= 0:
            return []
        out: list[int] = []
        total = 0
        seen = set(self.recorded[: len(self.current)][-1:])
        for u in self.recorded[len(self.current) :]:
            if u in seen:
                continue
            seen.add(u)
            if skip > 0:
                skip -= 1
                continue
            n = numel(u)
            if out and total + n > budget:
                break
            out.append(u)
            total += n
        return out

    def reuse_distance(self, unit: int, numel: Callable[[int], int]) -> int | None:
        """Elements fetched before ``unit`` is requested again in this iteration (None: not again, or unknown)."""
        if not self.on_track or self.recorded is None:
            return None
        distance = 0
        for u in self.recorded[len(self.current) :]:
            if u == unit:
                return distance
            distance += numel(u)
        return None
