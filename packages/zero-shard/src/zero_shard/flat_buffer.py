"""Flat, padded parameter layout and its partition into equal per-rank ranges.

One :class:`FlatLayout` per parameter group. The group's parameters are laid end to end (in the order
given) in one flat buffer whose length is padded up to a multiple of the data-parallel world size ``N``,
so that rank ``r`` owns the equal, contiguous range ``[r·P, (r+1)·P)`` with ``P = padded / N``.

[Note: why one layout for every stage] Stages 0, 1 and 2 all use the same layout, the same reduce
buckets and the same per-element optimizer arithmetic; they differ only in how much of the flat fp32
state a rank keeps (stage 0: all of it; stages 1-2: its partition). That is what makes the stages give
the same numbers, and it lets a stage-0 checkpoint be written as the same per-rank partitions as a
stage-1/2 one, so any stage and world size can load any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FlatLayout", "ParamSlot", "full_shape"]


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also while ``zero.Init`` holds only its partition (``ds_shape``)."""
    if getattr(p, "ds_tensor", None) is not None:
        return tuple(p.ds_shape)  # type: ignore[attr-defined]
    return tuple(p.shape)


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in its group's flat buffer: elements ``[offset, offset + numel)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def end(self) -> int:
        """One past the parameter's last element in the flat buffer."""
        return self.offset + self.numel


class FlatLayout:
    """The flat layout of one parameter group, padded to ``world_size`` equal partitions.

    ``params[i]`` is stored at ``slots[i]``; ``partition(r)`` is rank ``r``'s ``[start, end)`` range and
    ``fragments(r)`` lists, for every parameter that overlaps it, which flattened elements of that
    parameter rank ``r`` holds.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.params = [p for _, p in named_params]
        self.slots: list[ParamSlot] = []
        offset = 0
        for name, p in named_params:
            shape = full_shape(p)
            numel = math.prod(shape)
            self.slots.append(ParamSlot(name, shape, offset, numel))
            offset += numel
        self.numel = offset
        self.world_size = world_size
        # At least one element per rank, so that every rank has a (possibly all-padding) partition.
        self.padded_numel = max(world_size, -(-offset // world_size) * world_size)
        self.partition_numel = self.padded_numel // world_size

    def partition(self, rank: int) -> tuple[int, int]:
        """Rank ``rank``'s ``[start, end)`` range of the flat buffer."""
        return rank * self.partition_numel, (rank + 1) * self.partition_numel

    def fragments(self, rank: int) -> list[tuple[int, int, int]]:
        """``(slot index, start, end)`` for each parameter overlapping rank ``rank``'s partition.

        ``start``/``end`` index the parameter's own flattened elements (0 ≤ start < end ≤ numel).
        """
        lo, hi = self.partition(rank)
        out = []
        for i, s in enumerate(self.slots):
            a, b = max(lo, s.offset), min(hi, s.end)
            if a < b:
                out.append((i, a - s.offset, b - s.offset))
        return out

    def flatten(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """A new flat buffer holding the parameters' current values in ``dtype`` (padding zeroed)."""
        device = device if device is not None else self.params[0].device
        flat = torch.zeros(self.padded_numel, dtype=dtype, device=device)
        with torch.no_grad():
            for p, s in zip(self.params, self.slots, strict=True):
                flat[s.offset : s.end].copy_(p.detach().reshape(-1))
        return flat

    def bind_params(self, flat: torch.Tensor) -> None:
        """Make every parameter's data a view into ``flat`` (changing its dtype to ``flat``'s).

        After this, writing ``flat`` updates the model, and an all-gather into ``flat`` is all it takes to
        refresh the parameters after a partitioned step.
        """
        with torch.no_grad():
            for p, s in zip(self.params, self.slots, strict=True):
                p.data = flat[s.offset : s.end].view(s.shape)

    def buckets(self, bucket_numel: int) -> list[tuple[int, int, list[int]]]:
        """Split the flat buffer into reduce buckets: ``(start, end, slot indices)``, last parameters first.

        Gradients arrive roughly in reverse parameter order during backward, so bucket 0 covers the
        parameters at the end of the group. A bucket holds whole parameters and closes once it reaches
        ``bucket_numel`` elements (a larger parameter gets a bucket of its own). The padding tail
        belongs to the bucket holding the last parameter, so the buckets tile ``[0, padded_numel)``.
        """
        out: list[tuple[int, int, list[int]]] = []
        current: list[int] = []
        size = 0
        for i in reversed(range(len(self.slots))):
            if current and size + self.slots[i].numel > bucket_numel:
                out.append(self._bucket(current))
                current, size = [], 0
            current.append(i)
            size += self.slots[i].numel
        if current:
            out.append(self._bucket(current))
        return out

    def _bucket(self, idx: list[int]) -> tuple[int, int, list[int]]:
        start = min(self.slots[i].offset for i in idx)
        end = max(self.slots[i].end for i in idx)
        if end == self.numel:
            end = self.padded_numel
        return start, end, idx
