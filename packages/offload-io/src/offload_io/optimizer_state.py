"""Optimizer state on NVMe (ZeRO-Infinity): fp32 master pieces and their moments in swap files.

The optimizer's partition is cut into *pieces* (a piece is at most ``sub_group_size`` elements of one
master partition); each piece has one file per state tensor (``master``, ``exp_avg``, ``exp_avg_sq``).
:meth:`SwappedOptimizerState.sweep` runs a function over the pieces in order with the IO pipelined:

    fetch piece i (its read was started during piece i-1) -> start reading piece i+1 -> update piece i
    -> start writing piece i back (its buffers return to the pool when the write lands)

The pool holds ``max(buffer_count, 2 × states)`` piece-sized buffers: two pieces in flight (the one being
updated and the one being read); more buffers let write-back of one piece overlap the update of the next
too. That pool, plus the model's own tensors, is all the CPU memory the swapped state costs.

Moments start as zeros without touching the disk: a state tensor never written is created zeroed on its
first fetch (so ``fast_init`` is what happens anyway). Scratch files live in a per-run
:class:`~offload_io.scratch.ScratchDir`; they are not a checkpoint (checkpoints read the state through
:meth:`read_piece` into ordinary tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from offload_io.buffers import BufferPool, padded_numel
from offload_io.config import AioConfig, OffloadOptimizerConfig
from offload_io.io import open_handle
from offload_io.scratch import ScratchDir
from offload_io.swapper import TensorSwapper

__all__ = ["STATE_KEYS", "SwappedOptimizerState"]

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


class SwappedOptimizerState:
    """Pieces of fp32 optimizer state in swap files under ``config.nvme_path`` (see the module docstring)."""

    def __init__(
        self,
        config: OffloadOptimizerConfig,
        piece_numels: Sequence[int],
        *,
        aio: AioConfig | None = None,
        keys: Sequence[str] = STATE_KEYS,
        tag: str = "optimizer",
        overlap: bool = True,
    ) -> None:
        if config.nvme_path is None:
            raise ValueError("offload_optimizer.device='nvme' needs offload_optimizer.nvme_path")
        if not piece_numels:
            raise ValueError("SwappedOptimizerState: no pieces")
        self.keys = tuple(keys)
        self.piece_numels = [int(n) for n in piece_numels]
        self.overlap = overlap
        self.scratch = ScratchDir(config.nvme_path, tag)
        count = max(int(config.buffer_count), 2 * len(self.keys))
        largest = max(padded_numel(n, 4) for n in self.piece_numels)
        self.pool = BufferPool(count, largest, torch.float32, pin=config.pin_memory)
        self.swapper = TensorSwapper(self.scratch, self.pool, open_handle(aio), open_handle(aio))
        for pid, n in enumerate(self.piece_numels):
            for k in self.keys:
                self.swapper.register(self._key(pid, k), n)

    @staticmethod
    def _key(pid: int, key: str) -> str:
        return f"piece{pid}.{key}"

    @property
    def stats(self) -> Any:
        """The swapper's :class:`~offload_io.swapper.SwapStats`."""
        return self.swapper.stats

    def swapped_bytes(self) -> int:
        """Bytes of state kept in swap files (all pieces, all keys)."""
        return 4 * len(self.keys) * sum(self.piece_numels)

    # ---- whole-piece access -------------------------------------------------------------------------

    def write_piece(self, pid: int, values: dict[str, torch.Tensor], *, wait: bool = True) -> None:
        """Replace piece ``pid``'s tensors given in ``values`` (fp32, the piece's length).

        ``wait=False`` leaves the writes in flight (a later read of the same tensor, or :meth:`flush`, waits).
        """
        for k, t in values.items():
            key = self._key(pid, k)
            buf = self.swapper.new(key)
            buf.copy_(t.reshape(-1))
            self.swapper.write_back(key)
        if wait:
            self.swapper.flush()

    def flush(self) -> None:
        """Wait for every write in flight."""
        self.swapper.flush()

    def read_piece(self, pid: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Copies (ordinary tensors) of piece ``pid``'s state: for checkpoints and tests."""
        out = {}
        for k in keys or self.keys:
            out[k] = self._fetch(pid, k).clone()
            self.swapper.discard(self._key(pid, k))
        return out

    def close(self) -> None:
        """Wait for outstanding writes and remove the swap files."""
        try:
            self.swapper.flush()
        finally:
            self.scratch.cleanup()

    # ---- the pipelined sweep ------------------------------------------------------------------------------

    def sweep(self, order: Sequence[int], fn: Callable[[int, dict[str, torch.Tensor]], None]) -> None:
        """Call ``fn(pid, tensors)`` for every piece in ``order`` with its state in memory; write it all back."""
        order = list(order)
        if self.overlap and order:
            self._prefetch(order[0])
        for i, pid in enumerate(order):
            tensors = {k: self._fetch(pid, k) for k in self.keys}
            if self.overlap and i + 1 < len(order):
                self._prefetch(order[i + 1])
            fn(pid, tensors)
            for k in self.keys:
                self.swapper.write_back(self._key(pid, k))
            if not self.overlap:
                self.swapper.flush()
        self.swapper.flush()

    def _prefetch(self, pid: int) -> None:
        for k in self.keys:
            key = self._key(pid, k)
            if self.swapper.on_disk(key):
                self.swapper.prefetch(key)

    def _fetch(self, pid: int, k: str) -> torch.Tensor:
        key = self._key(pid, k)
        if self.swapper.on_disk(key) or self.swapper.is_resident(key):
            return self.swapper.fetch(key)
        return self.swapper.new(key).zero_()  # a moment before its first step
