"""Where the saved inputs of a checkpointed region live, and a meter for bytes saved for backward.

[Note: how a region's inputs are saved]
``torch.utils.checkpoint`` (non-reentrant) keeps a region's inputs for the recompute as autograd
``SavedTensor`` objects, created *before* its own saved-tensor hooks take over for the region's
inside. So saved-tensor hooks pushed around the ``checkpoint`` call see exactly the region's
inputs and nothing else: that is where :class:`RegionInputHooks` partitions them across the
model-parallel group (each rank keeps 1/N, all-gathered at the recompute) or moves them to host
memory. Inside the region torch saves only placeholders; the recompute refills them.

:class:`SavedActivationMeter` counts what is held for backward between forward and backward:
the tensors autograd saves outside checkpointed regions (its own saved-tensor hooks), the region
inputs kept by :class:`RegionInputHooks`, the op outputs a selective-checkpointing policy
caches and the random results kept for replay (``random_ops="replay"``). Bytes are counted per storage (views of one tensor count once), parameters excluded.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RegionInputHooks", "SavedActivationMeter", "SavedBytes"]

# Meters active in this process (a stack; usually zero or one). Region hooks and selective
# policies report what they hold to every active meter.
_ACTIVE_METERS: list[SavedActivationMeter] = []


class _Held:
    """Base of everything that holds tensors for backward and can be counted."""

    kind = "resident"

    def tensors(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class _Plain(_Held):
    """A tensor autograd saved, held detached (holding an op's output with its grad_fn would make a
    reference cycle through the graph, keeping it alive after the backward until the next GC)."""

    def __init__(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        # Parameters and leaf inputs live anyway: the meter does not count them as activations.
        self.lives_anyway = base.is_leaf and base.requires_grad
        self.t = t.detach()

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.t


class _Offloaded(_Held):
    """A region input kept in host memory; copied back to ``device`` for the recompute."""

    kind = "offloaded"

    def __init__(self, host: torch.Tensor, device: torch.device) -> None:
        self.host = host
        self.device = device

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.host


class _Partitioned(_Held):
    """This rank's 1/N of a flattened (zero-padded) region input, plus what rebuilds the whole."""

    def __init__(self, shard, shape, device, group, world, offloaded) -> None:
        self.shard = shard
        self.shape = shape
        self.device = device
        self.group = group
        self.world = world
        self.offloaded = offloaded

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "offloaded" if self.offloaded else "resident"

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.shard


class _SacStorage(_Held):
    """The op outputs a selective-checkpointing policy cached (torch's storage dict)."""

    def __init__(self, storage: dict[Any, dict[int, Any]]) -> None:
        self.storage = storage

    def tensors(self) -> Iterator[torch.Tensor]:
        for per_op in list(self.storage.values()):
            for entry in list(per_op.values()):
                # Entries are torch's _VersionWrapper trees, or sentinels once recomputed/consumed.
                val = getattr(entry, "val", None)
                if isinstance(val, torch.Tensor):
                    yield val
                elif isinstance(entry, (tuple, list)):
                    for e in entry:
                        v = getattr(e, "val", None)
                        if isinstance(v, torch.Tensor):
                            yield v


class _RandomStoreHeld(_Held):
    """What a region's random ops drew, kept for replay (``random_ops="replay"``)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self.store.tensors()


def _report(held: _Held) -> None:
    for meter in _ACTIVE_METERS:
        meter._track(held)


def report_sac_storage(storage: dict[Any, dict[int, Any]]) -> None:
    """Let active meters count what a selective policy caches (called when a region starts)."""
    if _ACTIVE_METERS:
        _report(_SacStorage(storage))


def report_random_store(store: Any) -> None:
    """Let active meters count the random results a region keeps for replay (a ``RandomStore``)."""
    if _ACTIVE_METERS:
        _report(_RandomStoreHeld(store))


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _pin_memory_default() -> bool:
    return torch.cuda.is_available()


class RegionInputHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks for a region's inputs: partition across ``group`` and/or keep on host.

    Only floating-point tensors that are not parameters are moved or split (parameters live
    anyway; integer inputs such as token ids are small). Partitioning assumes what Megatron and
    DeepSpeed assume: every rank of ``group`` holds the same value of the input (activations are
    replicated across tensor-parallel ranks outside the parallel layers); the input is zero-padded
    to a multiple of the group size, each rank keeps its slice, and the recompute all-gathers.
    """

    def __init__(self, group: Any | None, offload: bool, pin_memory: bool | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.offload = offload
        self.pin_memory = _pin_memory_default() if pin_memory is None else pin_memory
        super().__init__(self._pack, self._unpack)

    @property
    def active(self) -> bool:
        """Whether these hooks change anything (a group of 2+ ranks, or offloading)."""
        return self.world > 1 or self.offload

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t  # already in host memory: keep it, a copy would only cost time
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin_memory)
        # Asynchronous from pinned memory; the copy back is queued on the same stream, after it.
        host.copy_(t, non_blocking=self.pin_memory)
        return host

    def _pack(self, t: torch.Tensor) -> Any:
        if not t.is_floating_point() or (t.is_leaf and t.requires_grad):
            # Integer inputs (token ids) are small; parameters and leaf inputs live anyway.
            held: _Held = _Plain(t)
        elif self.world > 1 and t.numel() >= self.world:
            flat = t.detach().reshape(-1)
            chunk = -(-flat.numel() // self.world)
            start = self.rank * chunk
            end = min(start + chunk, flat.numel())
            shard = torch.zeros(chunk, dtype=t.dtype, device=t.device)
            if end > start:
                shard[: end - start].copy_(flat[start:end])
            if self.offload:
                shard = self._to_host(shard)
            held = _Partitioned(shard, t.shape, t.device, self.group, self.world, self.offload)
        elif self.offload:
            held = _Offloaded(self._to_host(t.detach()), t.device)
        else:
            held = _Plain(t)
        _report(held)
        return held

    @staticmethod
    def _unpack(held: Any) -> torch.Tensor:
        if isinstance(held, _Plain):
            return held.t
        if isinstance(held, _Offloaded):
            return held.host.to(held.device, non_blocking=True)
        shard = held.shard.to(held.device, non_blocking=True)
        full = torch.empty(shard.numel() * held.world, dtype=shard.dtype, device=held.device)
        _all_gather_single(full, shard, group=held.group)
        n = 1
        for s in held.shape:
            n *= s
        return full[:n].view(held.shape)


class SavedBytes(dict):
    """Bytes held for backward: ``{"resident": ..., "offloaded": ..., "total": ...}``."""

    @property
    def resident(self) -> int:
        """Bytes on the compute device (on a CPU-only run: everything not offloaded)."""
        return self["resident"]

    @property
    def offloaded(self) -> int:
        """Bytes moved to host memory by ``cpu_checkpointing``."""
        return self["offloaded"]

    @property
    def total(self) -> int:
        """Both."""
        return self["total"]


class SavedActivationMeter(torch.autograd.graph.saved_tensors_hooks):
    """Count the bytes saved for backward while active (enter it around the forward).

    ``meter.live()`` after the forward gives what the graph holds until the backward; after the
    backward it drops to zero. Parameters passed in ``ignore`` (and leaf tensors that require
    grad, and views of them) are not activations and are not counted. Storages are counted once
    however many saved tensors view them.
    """

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        self._ignore = {self._key(t) for t in ignore}
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._strong: list[_Held] = []  # nothing else references these wrappers: hold them here
        super().__init__(self._pack, self._unpack)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        return (str(t.device), t.untyped_storage().data_ptr())

    def __enter__(self) -> SavedActivationMeter:
        super().__enter__()
        _ACTIVE_METERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE_METERS.remove(self)
        super().__exit__(*exc)

    def _track(self, held: _Held) -> None:
        if isinstance(held, (_SacStorage, _RandomStoreHeld)):
            self._strong.append(held)
        else:
            self._held.add(held)

    def _pack(self, t: torch.Tensor) -> _Plain:
        held = _Plain(t)
        self._held.add(held)
        return held

    @staticmethod
    def _unpack(held: _Plain) -> torch.Tensor:
        return held.t

    def live(self) -> SavedBytes:
        """Bytes held for backward right now, by where they are."""
        seen: set[tuple[str, int]] = set(self._ignore)
        out = {"resident": 0, "offloaded": 0}
        for held in [*list(self._held), *self._strong]:
            if getattr(held, "lives_anyway", False):
                continue
            for t in held.tensors():
                key = self._key(t)
                if key in seen:
                    continue
                seen.add(key)
                out[held.kind] += t.untyped_storage().nbytes()
        return SavedBytes(resident=out["resident"], offloaded=out["offloaded"], total=sum(out.values()))
