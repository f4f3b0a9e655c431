"""One ZeRO-3 unit: the parameters a module holds, partitioned 1/N, gathered for use and released after.

A :class:`Unit` is a :class:`~zero_shard.flat_buffer.FlatLayout` of some parameters (those of one module
and one param group) with

- ``shard``: this rank's partition in the compute dtype, always resident (for an fp32 model it is the
  fp32 master partition itself, as at stages 1-2);
- ``full``: the whole flat buffer in the compute dtype. The parameters are views into it, bound once.
  Releasing the unit resizes ``full``'s storage to 0 bytes; gathering resizes it back and fills it from
  every rank's shard. The parameters keep their shapes throughout, only their memory comes and goes.

[Note: why resize the storage rather than swap ``param.data``] Autograd saves views of the parameters
for backward (``linear`` saves ``weight.t()``). A view shares the storage *object*: resizing that object
frees the memory between forward and backward and a re-gather makes the saved views valid again. Had we
swapped ``param.data`` for an empty tensor, the saved views would keep the old full tensor alive and
stage 3 would save nothing during a step. (FSDP1 and FSDP2 free unsharded parameters the same way.)

A *persistent* unit (parameters below ``stage3_param_persistence_threshold``) never releases: its full
buffer stays resident and is refreshed after each step, as stages 1-2 refresh theirs. Its optimizer
state and gradients are still partitioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zero_shard.comm import ParamCollective, gather_partitions, launch_gather
from zero_shard.flat_buffer import FlatLayout

__all__ = ["Unit", "UnitGatherError"]


class UnitGatherError(RuntimeError):
    """A stage-3 parameter gather failed or the ranks disagreed on which module they gather."""


@dataclass(eq=False)
class Unit:
    """A partitioned group of parameters (see the module docstring)."""

    index: int
    name: str
    layout: FlatLayout
    group: int
    persistent: bool
    rank: int
    world_size: int
    dtype: torch.dtype
    device: torch.device
    process_group: dist.ProcessGroup | None = None
    method: ParamCollective = "all_gather"
    full: torch.Tensor = field(init=False)
    shard: torch.Tensor = field(init=False)
    gathered: bool = field(init=False, default=True)
    works: list | None = field(init=False, default=None)
    pending_grads: int = field(init=False, default=0)
    pinned: int = field(init=False, default=0)  # > 0 inside GatheredParameters: not released by the hooks
    master: torch.Tensor | None = field(init=False, default=None)  # the fp32 master partition (set by the optimizer)
    store: Any = field(init=False, default=None)  # offload_param nvme: offload_io.SwappedParams holding the shard

    def __post_init__(self) -> None:
        self.full = torch.zeros(self.layout.padded_numel, dtype=self.dtype, device=self.device)
        self._nbytes = self.full.untyped_storage().nbytes()

    # ---- construction ---------------------------------------------------------------------------------

    def bind(self, values: torch.Tensor, shard: torch.Tensor | None = None) -> None:
        """Take the full flat values (any dtype) and this rank's ``shard`` tensor (None: a new one).

        For an fp32 model the caller passes the fp32 master partition as ``shard`` so that the two are
        one tensor.
        """
        lo, hi = self.layout.partition(self.rank)
        with torch.no_grad():
            self.full.copy_(values)
            if shard is None:
                shard = self.full[lo:hi].clone()
            elif shard.data_ptr() != self.full[lo:hi].data_ptr():
                shard.copy_(self.full[lo:hi])
        self.shard = shard
        self.layout.bind_params(self.full)
        for p in self.layout.params:
            p._zero3_unit = self  # type: ignore[attr-defined]
        self.gathered = True

    @property
    def numel(self) -> int:
        """Elements of the full (padded) buffer."""
        return self.layout.padded_numel

    @property
    def fetched(self) -> bool:
        """Gathered, or its gather in flight."""
        return self.gathered or self.works is not None

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this unit holds."""
        return self.layout.params

    # ---- gather and release -----------------------------------------------------------------------------

    def launch(self) -> None:
        """Start gathering (no-op when gathered or already in flight)."""
        if self.fetched:
            return
        self.full.untyped_storage().resize_(self._nbytes)
        lo, hi = self.layout.partition(self.rank)
        with torch.no_grad():
            if self.store is not None and not self.shard_resident():
                self.store.load(self.store_key, self.full[lo:hi])  # offload_param nvme: straight from the file
            else:
                self.full[lo:hi].copy_(self.shard, non_blocking=self.shard.is_pinned())
        try:
            self.works = launch_gather(
                self.full,
                self.layout.partition_numel,
                self.rank,
                self.world_size,
                method=self.method,
                group=self.process_group,
            )
        except Exception as e:
            raise UnitGatherError(f"rank {self.rank}: ZeRO-3 gather of {self.name} failed to start: {e}") from e

    def wait(self) -> None:
        """Finish a launched gather; the parameters are then valid."""
        if self.gathered:
            return
        if self.works is None:
            self.launch()
        assert self.works is not None
        try:
            for w in self.works:
                if isinstance(w, dist.Work):
                    w.wait()
        except Exception as e:
            raise UnitGatherError(
                f"rank {self.rank}: ZeRO-3 gather of {self.name} ({self.numel} elements) did not complete: {e}"
            ) from e
        self.works = None
        self.gathered = True

    def release(self) -> None:
        """Free the full buffer (persistent units keep it). Waits for an in-flight gather first."""
        if self.persistent or self.pinned:
            return
        if self.works is not None:
            self.wait()
        if self.gathered:
            if not self.full.untyped_storage().resizable():
                # Someone exported the buffer (``param.numpy()`` pins the storage's size): leave that memory to
                # them and move the parameters onto a fresh buffer of our own.
                self.full = torch.empty(self.layout.padded_numel, dtype=self.dtype, device=self.device)
                self.layout.bind_params(self.full)
            self.full.untyped_storage().resize_(0)
            self.gathered = False

    def refresh(self, bucket_numel: int) -> None:
        """After a step: a persistent unit re-gathers its full buffer from the updated shards."""
        if not self.persistent:
            return
        lo, hi = self.layout.partition(self.rank)
        with torch.no_grad():
            if self.full[lo:hi].data_ptr() != self.shard.data_ptr():
                self.full[lo:hi].copy_(self.shard)
        gather_partitions(
            self.full,
            self.layout.partition_numel,
            self.rank,
            self.world_size,
            method=self.method,
            bucket_numel=bucket_numel,
            group=self.process_group,
        )

    # ---- parameter offload (offload_param) ------------------------------------------------------------

    def place_shard(self, shard: torch.Tensor) -> None:
        """Keep the shard in ``shard`` from now on (offload_param cpu: a host tensor), values copied over."""
        with torch.no_grad():
            shard.copy_(self.shard)
        self.shard = shard

    def attach_store(self, store: Any, key: str) -> None:
        """offload_param nvme: write the shard to ``store`` and free its memory until it is needed again."""
        self.store, self.store_key = store, key
        self._shard_nbytes = self.shard.untyped_storage().nbytes()
        self.swap_out_shard()

    def shard_resident(self) -> bool:
        """False while an NVMe-offloaded shard is only in its file."""
        return self.shard.untyped_storage().nbytes() > 0

    def swap_in_shard(self, read: bool = True) -> None:
        """Bring an NVMe-offloaded shard into memory (``read=False``: the caller overwrites all of it)."""
        if self.store is None or self.shard_resident():
            return
        self.shard.untyped_storage().resize_(self._shard_nbytes)
        if read:
            self.store.load(self.store_key, self.shard)

    def swap_out_shard(self) -> None:
        """Write an NVMe-offloaded shard to its file and free its memory."""
        if self.store is None or not self.shard_resident():
            return
        self.store.save(self.store_key, self.shard)
        self.shard.untyped_storage().resize_(0)

    def resident_bytes(self) -> int:
        """Bytes of the full buffer currently allocated (0 when released)."""
        return self.full.untyped_storage().nbytes()
