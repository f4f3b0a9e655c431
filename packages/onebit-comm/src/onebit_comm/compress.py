"""1-bit compression with error feedback, and a single-process reference of the whole collective.

The arithmetic of :func:`onebit_comm.compressed_allreduce` lives here, as small functions on plain
tensors, so that the collective (``allreduce.py``) only moves bytes and the tests can run the very
same arithmetic for W simulated ranks in one process (:func:`reference_compressed_allreduce`).

[Note: the padded layout] A tensor of ``n`` elements is treated as a flat buffer of
``padded_numel(n, W)`` elements (a multiple of ``8 * W``), cut into ``W`` equal chunks of ``C``
elements, chunk ``j`` owned by rank ``j``. Padding sits at the tail only. Its input values are zero
and its error entries are kept at zero, so padding never moves a scale and never leaks into the
result: a chunk's scale is the root-mean-square over its *real* elements only
(``norm / sqrt(valid)``), and padded positions are forced back to zero wherever a value is decoded.

[Note: the sign rule] A value ``x >= 0`` is sent as bit 1 (decoded ``+scale``), ``x < 0`` as bit 0
(``-scale``): zero maps to ``+1``, as DeepSpeed's ``sign().add_(1).bool()`` does. Bits are packed
8 per byte, most significant bit first (``numpy.packbits`` order).
"""

from __future__ import annotations

import math
import sys

import torch

from ds_native import onebit as _ds_onebit

__all__ = [
    "chunk_numel",
    "compress_chunks_",
    "compressed_bytes",
    "decode_chunks",
    "decode_row",
    "fp32_allreduce_bytes",
    "pack_signs",
    "padded_numel",
    "reference_compressed_allreduce",
    "scales_from_sum_squares",
    "server_average",
    "server_weights",
    "unpack_signs",
    "valid_counts",
]

# [Note: packing 8 signs with one multiply] The sign test gives one byte (0 or 1) per element; eight
# consecutive bytes read as a little-endian int64 ``w`` hold element i's bit at bit 8i. Multiplying
# by 0x8040201008040201 (bits 0, 9, 18, ..., 63) moves bit 8i to bit 63 - i with no carries, so the
# top byte of the product is the packed byte, element 0 in the most significant bit. Four passes
# over n/8 words instead of a loop over 8 strided columns. Big-endian hosts use the plain weighted sum.
_MAGIC = 0x8040201008040201 - (1 << 64)  # the same bits as a signed int64
_LITTLE = sys.byteorder == "little"
_tables: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` fp32: row ``b`` is the 8 signs (+1/-1) byte ``b`` encodes, MSB first; cached per device."""
    t = _tables.get(device)
    if t is None:
        b = torch.arange(256, dtype=torch.int64)
        bits = (b.unsqueeze(1) >> torch.arange(7, -1, -1)) & 1
        t = _tables[device] = (bits.to(torch.float32) * 2.0 - 1.0).to(device)
    return t


class _Workspace:
    """Scratch buffers reused from call to call, one per (device, kind), grown as needed.

    [Note: why scratch buffers] On CPU a fresh multi-megabyte tensor costs page faults on first
    touch: measured on 16M elements, decoding into a new tensor took 58 ms and into a reused one
    9 ms. The price is one fp32 buffer of the largest tensor compressed (plus two byte buffers).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, str], torch.Tensor] = {}

    def get(self, kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``numel``-element view of the ``kind`` buffer (contents undefined)."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs.get((device, kind))
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[(device, kind)] = torch.empty(max(nbytes, 8), dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype)


_WS = _Workspace()


def padded_numel(numel: int, world_size: int) -> int:
    """Elements of the padded flat buffer: ``numel`` rounded up to a multiple of ``8 * world_size``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    unit = 8 * world_size
    return -(-int(numel) // unit) * unit


def chunk_numel(numel: int, world_size: int) -> int:
    """Elements of each rank's chunk (a multiple of 8)."""
    return padded_numel(numel, world_size) // world_size


def valid_counts(numel: int, world_size: int) -> list[int]:
    """For each chunk, how many of its elements are real (not padding)."""
    c = chunk_numel(numel, world_size)
    return [max(0, min(c, numel - j * c)) for j in range(world_size)]


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Sign bits of ``x`` (any shape, last dim a multiple of 8) packed 8 per byte along the last dim.

    Returns uint8 of shape ``(*x.shape[:-1], x.shape[-1] // 8)``; bit 1 means ``x >= 0``.
    """
    if x.shape[-1] % 8:
        raise ValueError(f"pack_signs: the last dimension ({x.shape[-1]}) must be a multiple of 8")
    if _LITTLE:
        n = x.numel()
        bits = _WS.get("mask", n, torch.bool, x.device)  # flat: row-major keeps each group of 8 together
        torch.ge(x, 0, out=bits.view(x.shape))
        words = bits.view(torch.uint8).view(torch.int64)  # 8 sign bytes per word
        prod = _WS.get("words", n // 8, torch.int64, x.device)
        # int64 multiply wraps; the top byte is the packed byte (see the note above); the cast keeps it.
        torch.mul(words, _MAGIC, out=prod)
        return prod.bitwise_right_shift_(56).to(torch.uint8).view(*x.shape[:-1], x.shape[-1] // 8)
    bits = (x >= 0).contiguous().view(torch.uint8)
    weights = torch.tensor((128, 64, 32, 16, 8, 4, 2, 1), dtype=torch.uint8, device=x.device)
    return (bits.reshape(*x.shape[:-1], -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: fp32 ``+1.0`` / ``-1.0`` of shape ``(*packed.shape[:-1], 8 * packed.shape[-1])``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs: expected uint8, got {packed.dtype}")
    signs = _sign_table(packed.device)[packed.reshape(-1).to(torch.int32)]
    return signs.view(*packed.shape[:-1], -1)


def decode_row(packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * sign`` for one chunk: ``packed`` uint8 ``[C / 8]``, ``scale`` a 1-element fp32 tensor.

    One table lookup per byte (the 256-entry table pre-multiplied by the scale), written to ``out``
    (fp32 ``[C]``, contiguous) when given.
    """
    table = _sign_table(packed.device) * scale.reshape(1, 1)
    flat = packed.reshape(-1)
    idx = _WS.get("idx", flat.numel(), torch.int32, packed.device)
    idx.copy_(flat)  # index_select wants int32/int64 indices, not bytes
    if out is None:
        return torch.index_select(table, 0, idx).view(-1)
    torch.index_select(table, 0, idx, out=out.view(-1, 8))
    return out


def scales_from_sum_squares(sumsq: list[float], valid: list[int]) -> torch.Tensor:
    """Per-row RMS over the real elements, ``sqrt(sumsq / valid)`` in double rounded to fp32; 0 for no real element.

    The one place the scale is computed from a sum of squares, shared by the torch path and the fused
    ds-native path (:mod:`onebit_comm.fused`), so both send the same bits.
    """
    return torch.tensor(
        [math.sqrt(s / v) if v > 0 else 0.0 for s, v in zip(sumsq, valid, strict=True)], dtype=torch.float32
    )


def _scales(x: torch.Tensor, valid: list[int]) -> torch.Tensor:
    """Per-row RMS over the real elements of ``x`` ``[rows, C]`` (padding is zero); 0 for an all-padding row.

    [Note: the scale's reduction] On CPU the sum of squares is ``ds_native.onebit.sum_squares`` (fp32
    squares added in a fixed order inside 1 Ki blocks, double sums over fixed 64 Ki pieces; the same
    bits on every ISA): the fused kernels compute exactly that sum while they write the values, so the
    torch path and the fused path agree bit for bit. Elsewhere (CUDA) it is torch's ``vector_norm``;
    those tensors never take the fused path.
    """
    if x.device.type == "cpu":
        sumsq = [_ds_onebit.sum_squares(row) for row in x]
        return scales_from_sum_squares(sumsq, valid)
    norms = torch.linalg.vector_norm(x, dim=-1)
    v = torch.tensor(valid, dtype=torch.float32, device=x.device)
    return torch.where(v > 0, norms / v.clamp(min=1).sqrt(), torch.zeros_like(norms))


def _zero_padding_(x: torch.Tensor, numel: int) -> None:
    """Zero the padded tail of a flat (or flattenable, contiguous) buffer."""
    flat = x.view(-1)
    if flat.numel() > numel:
        flat[numel:].zero_()


def compress_chunks_(
    x: torch.Tensor, error: torch.Tensor, numel: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker side: error-compensate ``x`` and compress it, one scale per chunk.

    ``x``: the ``numel`` input values (any float dtype, flat). ``error``: fp32 ``[padded_numel(numel, W)]``
    with zero padding; it is used as the working buffer: ``error := x + error`` is compressed, then
    ``error := (x + error) - scale * sign``, what the compression lost (padding kept at zero). Returns
    ``(packed, scales)``: uint8 ``[W, C / 8]`` and fp32 ``[W]``, row ``j`` being chunk ``j``.
    """
    error[:numel].add_(x.reshape(-1))
    rows = error.view(world_size, -1)
    scales = _scales(rows, valid_counts(numel, world_size)).to(error.device)
    packed = pack_signs(rows)
    tmp = _WS.get("f32", rows.shape[1], torch.float32, error.device)
    for j in range(world_size):
        # error = compensated - decoded, decoded from the very bits that are sent.
        rows[j].sub_(decode_row(packed[j], scales[j], out=tmp))
    _zero_padding_(error, numel)
    return packed, scales


def server_weights(scales: torch.Tensor) -> torch.Tensor:
    """The received scales divided by W (fp32): the average's per-rank weights, shared with the fused path."""
    return scales / scales.numel()


def server_average(
    packed: torch.Tensor, scales: torch.Tensor, server_error: torch.Tensor, valid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Server side for one chunk: average the W received compressed copies, error-compensate, recompress.

    ``packed`` is uint8 ``[W, C / 8]`` (row ``r`` from rank ``r``), ``scales`` fp32 ``[W]``, ``server_error``
    fp32 ``[C]`` (updated in place: compensated, then what the recompression lost). ``valid``: the
    chunk's real elements. Returns the chunk's ``(packed [C / 8], scale [1])``.
    """
    w, c = packed.shape[0], packed.shape[1] * 8
    tmp = _WS.get("f32", 2 * c, torch.float32, server_error.device)
    avg, other = tmp[:c], tmp[c:]
    weighted = server_weights(scales)
    decode_row(packed[0], weighted[0], out=avg)
    for r in range(1, w):  # rank order, the same on every rank and in the reference
        avg.add_(decode_row(packed[r], weighted[r], out=other))
    _zero_padding_(avg, valid)
    server_error.add_(avg)
    scale = _scales(server_error.unsqueeze(0), [valid]).to(avg.device)
    out = pack_signs(server_error)
    server_error.sub_(decode_row(out, scale, out=avg))
    _zero_padding_(server_error, valid)
    return out, scale


def decode_chunks(
    packed: torch.Tensor, scales: torch.Tensor, numel: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """All chunks decoded into one flat fp32 tensor of ``numel`` elements (padding dropped).

    ``packed`` uint8 ``[W, C / 8]``, ``scales`` fp32 ``[W]``. ``out``: an fp32 contiguous buffer of
    ``W * C`` elements to decode into (then its first ``numel`` are returned); without it the result
    is a view of a scratch buffer that the next call overwrites: copy it.
    """
    w, c8 = packed.shape
    if out is None:
        out = _WS.get("f32", w * c8 * 8, torch.float32, packed.device)  # the caller copies it out
    rows = out.view(w, c8 * 8)
    for j in range(w):
        decode_row(packed[j], scales[j], out=rows[j])
    return out.view(-1)[:numel]


def reference_compressed_allreduce(
    tensors: list[torch.Tensor], worker_errors: list[torch.Tensor], server_errors: list[torch.Tensor]
) -> list[torch.Tensor]:
    """What :func:`onebit_comm.compressed_allreduce` computes on ``W = len(tensors)`` ranks, in one process.

    ``tensors[r]`` is rank ``r``'s input; ``worker_errors[r]`` / ``server_errors[r]`` its error buffers,
    updated in place exactly as the collective updates them. Returns each rank's result (all equal).
    """
    w = len(tensors)
    if not (w == len(worker_errors) == len(server_errors)) or w == 0:
        raise ValueError("reference_compressed_allreduce: one tensor and two error buffers per rank")
    numel = tensors[0].numel()
    sent = [compress_chunks_(t, we, numel, w) for t, we in zip(tensors, worker_errors, strict=True)]
    valid = valid_counts(numel, w)
    gathered_p, gathered_s = [], []
    for j in range(w):
        packed = torch.stack([sent[r][0][j] for r in range(w)])
        scales = torch.stack([sent[r][1][j] for r in range(w)])
        p, s = server_average(packed, scales, server_errors[j], valid[j])
        gathered_p.append(p)
        gathered_s.append(s)
    flat = decode_chunks(torch.stack(gathered_p), torch.cat(gathered_s), numel)
    return [flat.clone().view(t.shape).to(t.dtype) for t in tensors]


def fp32_allreduce_bytes(numel: int, world_size: int) -> float:
    """Bytes each rank sends in a bandwidth-optimal (ring) fp32 all-reduce: ``2 (W-1)/W * 4 n``."""
    return 2.0 * (world_size - 1) / world_size * 4.0 * numel


def compressed_bytes(numel: int, world_size: int) -> int:
    """Bytes each rank sends in :func:`onebit_comm.compressed_allreduce`: ``2 (W-1) (C/8 + 4)``.

    Phase 1 sends W-1 chunks (C/8 sign bytes + a 4-byte scale each) to their owners; phase 2 sends this
    rank's recompressed chunk to the W-1 others.
    """
    if world_size == 1:
        return 0
    return 2 * (world_size - 1) * (chunk_numel(numel, world_size) // 8 + 4)
