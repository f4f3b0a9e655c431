"""The arithmetic of :mod:`onebit_comm.compress` through ds-native's fused CPU kernels, one pass per step.

Where the torch path makes several passes over each buffer (add the error, reduce, compare, pack,
decode, subtract, zero the padding), each function here is one pass (plus, for the worker side, the
sum of squares taken while the piece is still in cache) and writes its signs straight into the
message buffer the collective sends. Per element the operations are the torch path's, in the same
order, and the scales come from the same sums of squares (see compress.py, [Note: the scale's
reduction]): results, error buffers and bytes on the wire are bitwise those of the torch path
(tests/test_fused.py).

Used by :func:`onebit_comm.compressed_allreduce` for CPU tensors of fp32/bf16/fp16 when the installed
ds-native has the kernels (:func:`usable`); everything else takes the torch path.
"""

from __future__ import annotations

import torch

from ds_native import onebit as _k
from onebit_comm.compress import scales_from_sum_squares, server_weights

__all__ = [
    "compress_deferred_into_",
    "compress_into_",
    "compress_signs_into_",
    "decode_into",
    "server_deferred_into_",
    "server_into_",
    "server_settle_",
    "server_signs_into_",
    "settle_",
    "usable",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def usable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can take the fused path: CPU, fp32/bf16/fp16, and kernels in this ds-native."""
    return tensor.device.type == "cpu" and tensor.dtype in _DTYPES and _k.available()


def compress_into_(x: torch.Tensor, error: torch.Tensor, valid: list[int], bits: torch.Tensor) -> torch.Tensor:
    """Worker side (:func:`onebit_comm.compress.compress_chunks_`): ``error += x``, compress per chunk.

    ``bits`` is uint8 ``[W, >= C/8]`` (a message buffer's sign columns: row ``j`` goes to rank ``j``);
    ``error`` is left holding what the compression lost. Returns the W fp32 scales.
    """
    scales = compress_signs_into_(x, error, valid, bits)
    settle_(error, len(valid), scales, valid)
    return scales


def compress_signs_into_(x: torch.Tensor, error: torch.Tensor, valid: list[int], bits: torch.Tensor) -> torch.Tensor:
    """The first half of :func:`compress_into_`: ``error += x``, its signs into ``bits``, the W scales.

    Signs need no scale, so they can go on the wire before :func:`settle_` makes ``error`` the
    compression error (the collective overlaps the two).
    """
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return scales_from_sum_squares(_k.compensate_(flat, error, len(valid), out=bits), valid)


def server_into_(
    bits: torch.Tensor, scales: torch.Tensor, server_error: torch.Tensor, valid: int, out_bits: torch.Tensor
) -> torch.Tensor:
    """Server side (:func:`onebit_comm.compress.server_average`) for this rank's chunk.

    ``bits`` uint8 ``[W, >= C/8]`` (row ``r`` from rank ``r``), ``scales`` their fp32 ``[W]``. Writes the
    recompressed chunk's signs into ``out_bits`` (uint8 ``[1, >= C/8]``) and returns its scale (fp32 ``[1]``).
    """
    scale = server_signs_into_(bits, scales, server_error, valid, out_bits)
    # The second pass's signs go to a scratch: out_bits keeps the first pass's (what the collective sends).
    server_settle_(bits, scales, server_error, valid, scale, torch.empty_like(out_bits))
    return scale


def server_signs_into_(
    bits: torch.Tensor, scales: torch.Tensor, server_error: torch.Tensor, valid: int, out_bits: torch.Tensor
) -> torch.Tensor:
    """The read-only first pass of :func:`server_into_`: the signs into ``out_bits``, the scale (fp32 ``[1]``)."""
    weights = server_weights(scales).tolist()
    return scales_from_sum_squares([_k.server_sum_squares(bits, weights, server_error, valid, out=out_bits)], [valid])


def server_settle_(
    bits: torch.Tensor,
    scales: torch.Tensor,
    server_error: torch.Tensor,
    valid: int,
    scale: torch.Tensor,
    scratch_bits: torch.Tensor,
) -> None:
    """The second pass of :func:`server_into_`: ``server_error`` := what the recompression lost.

    It writes the signs again (the same bytes) into ``scratch_bits``, uint8 ``[1, >= C/8]``: pass a
    buffer the collective is not sending from.
    """
    _k.server_pack_(bits, server_weights(scales).tolist(), server_error, valid, scratch_bits, scale.item())


def compress_deferred_into_(
    x: torch.Tensor, error: torch.Tensor, valid: list[int], bits: torch.Tensor, prev: torch.Tensor | None
) -> torch.Tensor:
    """:func:`compress_into_` with the error update deferred: one pass over ``error`` instead of two.

    ``prev`` (fp32 ``[W]`` or None): the scales of the update the last call deferred. ``error`` is
    left holding the compensated values; the returned scales are the update deferred now.
    """
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    sums = _k.compress_deferred_(flat, error, len(valid), bits, None if prev is None else prev.tolist(), valid)
    return scales_from_sum_squares(sums, valid)


def server_deferred_into_(
    bits: torch.Tensor,
    scales: torch.Tensor,
    server_error: torch.Tensor,
    valid: int,
    out_bits: torch.Tensor,
    prev: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`server_into_` with the error update deferred (``prev``: fp32 ``[1]`` or None); one pass."""
    weights = server_weights(scales).tolist()
    p = None if prev is None else prev.item()
    return scales_from_sum_squares([_k.server_deferred_(bits, weights, server_error, valid, out_bits, p)], [valid])


def settle_(error: torch.Tensor, rows: int, scales: torch.Tensor, valid: list[int]) -> None:
    """Apply a deferred update: ``error`` holds errors again (bitwise what the exact path leaves)."""
    _k.settle_(error, rows, scales.tolist(), valid)


def decode_into(bits: torch.Tensor, scales: torch.Tensor, chunk: int, out: torch.Tensor) -> torch.Tensor:
    """All chunks decoded (:func:`onebit_comm.compress.decode_chunks`) into ``out``, fp32 contiguous, padding dropped."""
    return _k.decode(bits, scales.tolist(), chunk, out)
