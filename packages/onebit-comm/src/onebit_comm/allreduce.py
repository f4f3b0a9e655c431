"""The two-phase error-compensated 1-bit all-reduce, on any torch.distributed backend.

Phase 1 (worker side): each rank adds its worker error to its tensor, compresses every chunk to
sign bits plus one fp32 scale, and sends chunk ``j`` to rank ``j`` (one ``all_to_all_single``).
Phase 2 (server side): rank ``j`` averages the W compressed copies of its chunk, adds its server
error, recompresses, and every rank collects every recompressed chunk (one all-gather). Each rank
then decodes the same bytes, so every rank ends with the identical averaged tensor.

Bytes each rank sends: ``2 (W-1) (C/8 + 4)`` with ``C`` the chunk size (see
:func:`onebit_comm.compress.compressed_bytes`), against ``2 (W-1)/W * 4n`` for a ring fp32
all-reduce: about 1/32 of it. Sign bytes and the scale travel in one message per chunk, so a call is
exactly two collectives whatever the tensor size.

The arithmetic is in :mod:`onebit_comm.compress` (torch ops) and :mod:`onebit_comm.fused` (the same
arithmetic in ds-native's fused CPU kernels, bitwise equal, used by default on CPU); this module
only lays out and moves bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from onebit_comm import fused as _fused
from onebit_comm.compress import (
    _WS,
    chunk_numel,
    compress_chunks_,
    compressed_bytes,
    decode_chunks,
    padded_numel,
    server_average,
    valid_counts,
)

__all__ = ["CommStats", "PendingErrors", "compressed_allreduce", "error_buffers"]


@dataclass
class CommStats:
    """Bytes this rank put on the wire in :func:`compressed_allreduce` calls, counted per message sent.

    ``bytes_sent`` counts the phase-1 chunks sent to other ranks (the one a rank keeps is not sent)
    plus the phase-2 chunk once per receiving rank.
    """

    bytes_sent: int = 0
    calls: int = 0

    def reset(self) -> None:
        """Start counting from zero."""
        self.bytes_sent = 0
        self.calls = 0


@dataclass
class PendingErrors:
    """Error updates that :func:`compressed_allreduce` deferred, for one ``(worker_error, server_error)`` pair.

    [Note: deferred error updates] Each side of the collective compensates its error buffer
    (``c = error + input``), needs the scale of the whole chunk (the RMS of ``c``) before it can write
    the new error ``c - scale * sign(c)``, and so crosses the buffer twice. With ``pending=`` the
    call leaves ``c`` in the buffers and records the scales here; the next call applies them in the
    same pass that reads the buffer (one memory pass per buffer per call). The signs, scales, result
    and bytes are bitwise those of the exact call, and :meth:`settle_` turns the buffers into exactly
    the errors the exact calls would have left. Only the fused CPU kernels defer; on any other path
    the call settles first and runs exactly.

    ``scales`` is None (nothing deferred: the buffers hold errors) or fp32 ``[W + 1]``: the W worker
    chunks' scales, then this rank's server chunk's. Keep one per error-buffer pair, next to it
    (the 1-bit optimizers keep it in their state, so checkpoints carry it with the buffers).
    """

    scales: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether the buffers hold compensated values waiting for :meth:`settle_`."""
        return self.scales is not None

    def settle_(
        self,
        worker_error: torch.Tensor,
        server_error: torch.Tensor,
        numel: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """Apply the deferred updates now: the buffers hold the errors again (and nothing is pending).

        ``numel``: the elements of the tensor they belong to; ``group`` the collective's (for this
        rank's chunk). No-op when nothing is pending.
        """
        if self.scales is None:
            return
        rank, w = _world(group)
        if self.scales.numel() != w + 1:
            raise ValueError(
                f"PendingErrors.settle_: {self.scales.numel() - 1} worker scales recorded, the group has {w} ranks"
            )
        _check_error_buffers(numel, worker_error.device, worker_error, server_error, w)
        valid = valid_counts(numel, w)
        scales = self.scales.to(torch.float32)
        _fused.settle_(worker_error, w, scales[:w], valid)
        _fused.settle_(server_error, 1, scales[w:], [valid[rank]])
        self.scales = None


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def error_buffers(
    numel: int, world_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (zero) ``(worker_error, server_error)`` for a tensor of ``numel`` elements on ``world_size`` ranks.

    ``worker_error`` has ``padded_numel(numel, W)`` elements, ``server_error`` one chunk's
    (``padded / W``); both fp32.
    """
    return (
        torch.zeros(padded_numel(numel, world_size), dtype=torch.float32, device=device),
        torch.zeros(chunk_numel(numel, world_size), dtype=torch.float32, device=device),
    )


def _check_error_buffers(
    n: int, device: torch.device, worker_error: torch.Tensor, server_error: torch.Tensor, w: int
) -> None:
    """The error buffers of a tensor of ``n`` elements on ``device``, ``w`` ranks: shape, dtype, device."""
    want_w, want_s = padded_numel(n, w), chunk_numel(n, w)
    for name, buf, want in (("worker_error", worker_error, want_w), ("server_error", server_error, want_s)):
        if buf.dtype != torch.float32 or buf.numel() != want or not buf.is_contiguous():
            raise ValueError(
                f"compressed_allreduce: {name} must be a contiguous fp32 tensor of {want} elements for a tensor of "
                f"{n} elements on {w} ranks (got {buf.dtype}, {buf.numel()} elements); make them with "
                f"onebit_comm.error_buffers({n}, {w}, device)"
            )
        if buf.device != device:
            raise ValueError(f"compressed_allreduce: {name} is on {buf.device}, the tensor on {device}")


def _check_buffers(tensor: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor, w: int) -> None:
    _check_error_buffers(tensor.numel(), tensor.device, worker_error, server_error, w)
    if not tensor.is_floating_point():
        raise TypeError(f"compressed_allreduce: needs a floating-point tensor, got {tensor.dtype}")


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); accept both.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _scale_bytes(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales ``[k]`` as their raw bytes ``[k, 4]`` (they ride in the same message as the signs)."""
    return scales.contiguous().view(torch.uint8).view(-1, 4)


def _bytes_scale(raw: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_scale_bytes`: ``[k, 4]`` uint8 to fp32 ``[k]``."""
    return raw.contiguous().view(torch.float32).view(-1)


@contextlib.contextmanager
def _naming_failures(rank: int, w: int, what: str) -> Iterator[None]:
    """Starting or waiting for a collective: a failure names the rank and the operation."""
    try:
        yield
    except RuntimeError as e:
        raise RuntimeError(f"compressed_allreduce rank {rank}/{w}: {what} failed: {e}") from e


def _decode_rows(bits: torch.Tensor, scales: torch.Tensor, first: int, c: int, dst: torch.Tensor) -> None:
    """Decode chunks ``first .. first + len(scales)`` (message rows ``bits``) into their place in flat ``dst``."""
    start, stop = first * c, min((first + scales.numel()) * c, dst.numel())
    if scales.numel() and stop > start:
        _fused.decode_into(bits, scales, c, dst[start:stop])


def compressed_allreduce(
    tensor: torch.Tensor,
    worker_error: torch.Tensor,
    server_error: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    stats: CommStats | None = None,
    fused: bool | None = None,
    pending: PendingErrors | None = None,
) -> torch.Tensor:
    """Average ``tensor`` over ``group`` with 1-bit compression and error feedback; in place, returned.

    Collective: every rank of ``group`` calls it with a tensor of the same number of elements. Any
    size and shape; padding to a multiple of ``8 * W`` is internal. ``worker_error`` and
    ``server_error`` (from :func:`error_buffers`) carry the compression errors between calls and are
    updated in place: keep one pair per tensor, per rank. The result is the same on every rank. On
    a single process it returns ``tensor`` unchanged (the average of one).

    ``fused``: None (default) uses ds-native's fused CPU kernels where they apply (CPU fp32/bf16/fp16
    tensors, :mod:`onebit_comm.fused`) and torch ops elsewhere; False forces the torch ops; True
    requires the kernels. Both give bitwise the same result, error buffers and bytes.

    ``pending``: defer the error updates (see :class:`PendingErrors`): on the fused path the buffers
    are then left holding the compensated values and ``pending`` the scales that settle them, which
    saves one memory pass over each buffer; the result is bitwise the same. Elsewhere the call
    settles ``pending`` and runs exactly.
    """
    rank, w = _world(group)
    n = tensor.numel()
    if w == 1 or n == 0:
        return tensor
    _check_buffers(tensor, worker_error, server_error, w)
    use_fused = _fused.usable(tensor) if fused is None else bool(fused)
    if use_fused and not _fused.usable(tensor):
        raise ValueError(
            f"compressed_allreduce(fused=True): needs a CPU fp32/bf16/fp16 tensor and a ds-native with the 1-bit "
            f"kernels (got {tensor.device}, {tensor.dtype}); pass fused=None to fall back to torch ops"
        )
    c = chunk_numel(n, w)
    c8 = c // 8
    valid = valid_counts(n, w)
    deferred = pending is not None and use_fused
    prev = None
    if pending is not None and pending.active:
        if pending.scales.numel() != w + 1:
            raise ValueError(
                f"compressed_allreduce rank {rank}/{w}: pending holds {pending.scales.numel() - 1} worker scales, "
                f"the group has {w} ranks (a PendingErrors belongs to one tensor on one group)"
            )
        if deferred:
            prev = pending.scales.to(torch.float32)
        else:
            pending.settle_(worker_error, server_error, n, group)
    # Message buffers are reused from call to call (see compress.py, [Note: why scratch buffers]):
    # a fresh one costs page faults on first touch. Row j of `send` goes to rank j: sign bytes, then
    # the 4 bytes of its scale, so each chunk is one message.
    send = _WS.get("send", w * (c8 + 4), torch.uint8, tensor.device).view(w, c8 + 4)
    recv = _WS.get("recv", w * (c8 + 4), torch.uint8, tensor.device).view(w, c8 + 4)
    msg = _WS.get("msg", c8 + 4, torch.uint8, tensor.device)
    out = _WS.get("gather", w * (c8 + 4), torch.uint8, tensor.device)
    with torch.no_grad():
        # [Note: overlap] Signs need no scale. On the exact fused path each side writes its signs
        # in its first pass and does its error update (a pass over the error buffer) while those
        # bytes travel; and every fused path decodes this rank's own chunk during the all-gather.
        if deferred:
            scales = _fused.compress_deferred_into_(
                tensor.detach(), worker_error, valid, send, None if prev is None else prev[:w]
            )
        elif use_fused:
            scales = _fused.compress_signs_into_(tensor.detach(), worker_error, valid, send)
        else:
            packed, scales = compress_chunks_(tensor.detach(), worker_error, n, w)
            send[:, :c8] = packed
        send[:, c8:] = _scale_bytes(scales)

        # Phase 1: chunk j goes to rank j.
        what = "phase 1 all_to_all_single"
        with _naming_failures(rank, w, what):
            work = dist.all_to_all_single(recv, send, group=group, async_op=True)
        if use_fused and not deferred:
            _fused.settle_(worker_error, w, scales, valid)
        with _naming_failures(rank, w, what):
            work.wait()
        got = _bytes_scale(recv[:, c8:])
        if deferred:
            scale = _fused.server_deferred_into_(
                recv, got, server_error, valid[rank], msg.view(1, -1), None if prev is None else prev[w:]
            )
            pending.scales = torch.cat([scales, scale])
        elif use_fused:
            scale = _fused.server_signs_into_(recv, got, server_error, valid[rank], msg.view(1, -1))
        else:
            mine, scale = server_average(recv[:, :c8], got, server_error, valid[rank])
            msg[:c8] = mine
        msg[c8:] = _scale_bytes(scale).view(-1)

        # Phase 2: every rank collects every owner's recompressed chunk.
        what = "phase 2 all_gather"
        with _naming_failures(rank, w, what):
            work = _all_gather(out, msg, group=group, async_op=True)
        straight = tensor.dtype == torch.float32 and tensor.is_contiguous()
        if use_fused:
            if not deferred:
                scratch = _WS.get("signs", c8 + 4, torch.uint8, tensor.device).view(1, -1)
                _fused.server_settle_(recv, got, server_error, valid[rank], scale, scratch)
            dst = tensor.view(-1) if straight else _WS.get("f32", n, torch.float32, tensor.device)
            _decode_rows(msg.view(1, -1), scale, rank, c, dst)
        with _naming_failures(rank, w, what):
            work.wait()
        rows = out.view(w, c8 + 4)
        final = _bytes_scale(rows[:, c8:])
        if use_fused:
            _decode_rows(rows[:rank], final[:rank], 0, c, dst)
            _decode_rows(rows[rank + 1 :], final[rank + 1 :], rank + 1, c, dst)
            if not straight:
                tensor.copy_(dst.view(tensor.shape))
        elif straight and n == padded_numel(n, w):
            decode_chunks(rows[:, :c8], final, n, out=tensor.view(-1))  # straight in
        else:
            tensor.copy_(decode_chunks(rows[:, :c8], final, n).view(tensor.shape))
    if stats is not None:
        # Counted from the buffers actually handed to the collectives: phase 1 sends every row but
        # this rank's own; phase 2 delivers this rank's message to each of the W-1 others.
        sent = (send.numel() - send[rank].numel()) + msg.numel() * (w - 1)
        assert sent == compressed_bytes(n, w)
        stats.bytes_sent += sent
        stats.calls += 1
    return tensor
