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

The arithmetic is in :mod:`onebit_comm.compress`; this module only lays out and moves bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from onebit_comm.compress import (
    chunk_numel,
    compress_chunks_,
    compressed_bytes,
    decode_chunks,
    padded_numel,
    server_average,
    valid_counts,
)

__all__ = ["CommStats", "compressed_allreduce", "error_buffers"]


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


def _check_buffers(tensor: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor, w: int) -> None:
    n = tensor.numel()
    want_w, want_s = padded_numel(n, w), chunk_numel(n, w)
    for name, buf, want in (("worker_error", worker_error, want_w), ("server_error", server_error, want_s)):
        if buf.dtype != torch.float32 or buf.numel() != want or not buf.is_contiguous():
            raise ValueError(
                f"compressed_allreduce: {name} must be a contiguous fp32 tensor of {want} elements for a tensor of "
                f"{n} elements on {w} ranks (got {buf.dtype}, {buf.numel()} elements); make them with "
                f"onebit_comm.error_buffers({n}, {w}, device)"
            )
        if buf.device != tensor.device:
            raise ValueError(f"compressed_allreduce: {name} is on {buf.device}, the tensor on {tensor.device}")
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


def compressed_allreduce(
    tensor: torch.Tensor,
    worker_error: torch.Tensor,
    server_error: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Average ``tensor`` over ``group`` with 1-bit compression and error feedback; in place, returned.

    Collective: every rank of ``group`` calls it with a tensor of the same number of elements. Any
    size and shape; padding to a multiple of ``8 * W`` is internal. ``worker_error`` and
    ``server_error`` (from :func:`error_buffers`) carry the compression errors between calls and are
    updated in place: keep one pair per tensor, per rank. The result is the same on every rank. On
    a single process it returns ``tensor`` unchanged (the average of one).
    """
    rank, w = _world(group)
    n = tensor.numel()
    if w == 1 or n == 0:
        return tensor
    _check_buffers(tensor, worker_error, server_error, w)
    c8 = chunk_numel(n, w) // 8
    packed, scales = compress_chunks_(tensor, worker_error, n, w)

    # Phase 1: chunk j (its sign bytes, then its scale's 4 bytes) goes to rank j.
    send = torch.empty(w, c8 + 4, dtype=torch.uint8, device=tensor.device)
    send[:, :c8] = packed
    send[:, c8:] = _scale_bytes(scales)
    recv = torch.empty_like(send)
    try:
        dist.all_to_all_single(recv, send, group=group)
    except RuntimeError as e:
        raise RuntimeError(f"compressed_allreduce rank {rank}/{w}: phase 1 all_to_all_single failed: {e}") from e
    mine, scale = server_average(recv[:, :c8], _bytes_scale(recv[:, c8:]), server_error, valid_counts(n, w)[rank])

    # Phase 2: every rank collects every owner's recompressed chunk.
    msg = torch.empty(c8 + 4, dtype=torch.uint8, device=tensor.device)
    msg[:c8] = mine
    msg[c8:] = _scale_bytes(scale).view(-1)
    out = torch.empty(w * (c8 + 4), dtype=torch.uint8, device=tensor.device)
    try:
        _all_gather(out, msg, group=group)
    except RuntimeError as e:
        raise RuntimeError(f"compressed_allreduce rank {rank}/{w}: phase 2 all_gather failed: {e}") from e
    out = out.view(w, c8 + 4)
    with torch.no_grad():
        if tensor.dtype == torch.float32 and tensor.is_contiguous() and n == padded_numel(n, w):
            decode_chunks(out[:, :c8], _bytes_scale(out[:, c8:]), n, out=tensor.view(-1))  # straight in
        else:
            tensor.copy_(decode_chunks(out[:, :c8], _bytes_scale(out[:, c8:]), n).view(tensor.shape))
    if stats is not None:
        # Counted from the buffers actually handed to the collectives: phase 1 sends every row but
        # this rank's own; phase 2 delivers this rank's message to each of the W-1 others.
        sent = (send.numel() - send[rank].numel()) + msg.numel() * (w - 1)
        assert sent == compressed_bytes(n, w)
        stats.bytes_sent += sent
        stats.calls += 1
    return tensor
