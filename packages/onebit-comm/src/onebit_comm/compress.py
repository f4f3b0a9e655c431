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

import torch

__all__ = [
    "chunk_numel",
    "compress_chunks_",
    "compressed_bytes",
    "decode_chunks",
    "fp32_allreduce_bytes",
    "pack_signs",
    "padded_numel",
    "reference_compressed_allreduce",
    "server_average",
    "unpack_signs",
    "valid_counts",
]

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
_weights_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _weights(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(bit weights uint8, shifts uint8) on ``device``, cached: built once per device."""
    w = _weights_cache.get(device)
    if w is None:
        w = (
            torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device),
            torch.arange(7, -1, -1, dtype=torch.uint8, device=device),
        )
        _weights_cache[device] = w
    return w


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
    weights, _ = _weights(x.device)
    bits = (x >= 0).view(torch.uint8).reshape(*x.shape[:-1], -1, 8)
    # Weighted sum of 8 distinct powers of two never exceeds 255: exact in uint8.
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: fp32 ``+1.0`` / ``-1.0`` of shape ``(*packed.shape[:-1], 8 * packed.shape[-1])``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs: expected uint8, got {packed.dtype}")
    _, shifts = _weights(packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1).to(torch.float32).mul_(2.0).sub_(1.0)


def _scales(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row RMS over the real elements: ``||row|| / sqrt(valid)``; 0 for an all-padding row."""
    norms = torch.linalg.vector_norm(x, dim=-1)
    return torch.where(valid > 0, norms / valid.clamp(min=1).sqrt(), torch.zeros_like(norms))


def _zero_padding_(x: torch.Tensor, numel: int) -> None:
    """Zero the padded tail of a flat (or flattenable, contiguous) buffer."""
    flat = x.view(-1)
    if flat.numel() > numel:
        flat[numel:].zero_()


def compress_chunks_(
    x: torch.Tensor, error: torch.Tensor, numel: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker side: error-compensate ``x`` and compress it, one scale per chunk.

    ``x`` and ``error`` are fp32 flat buffers of ``padded_numel(numel, world_size)`` elements (``x`` with
    zero padding). ``x`` is overwritten with ``x + error`` and ``error`` with what the compression lost,
    ``(x + error) - scale * sign``, padding kept at zero. Returns ``(packed, scales)``: uint8
    ``[world_size, C / 8]`` and fp32 ``[world_size]``, row ``j`` being chunk ``j``.
    """
    x.add_(error)
    rows = x.view(world_size, -1)
    valid = torch.tensor(valid_counts(numel, world_size), dtype=torch.float32, device=x.device)
    scales = _scales(rows, valid)
    packed = pack_signs(rows)
    # error = compensated - decoded, computed from the same bits that are sent.
    torch.sub(rows, unpack_signs(packed).mul_(scales.unsqueeze(1)), out=error.view(world_size, -1))
    _zero_padding_(error, numel)
    return packed, scales


def server_average(
    packed: torch.Tensor, scales: torch.Tensor, server_error: torch.Tensor, valid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Server side for one chunk: average the W received compressed copies, error-compensate, recompress.

    ``packed`` is uint8 ``[W, C / 8]`` (row ``r`` from rank ``r``), ``scales`` fp32 ``[W]``, ``server_error``
    fp32 ``[C]`` (updated in place). ``valid``: the chunk's real elements. Returns the chunk's
    ``(packed [C / 8], scale [1])``.
    """
    w = packed.shape[0]
    avg = unpack_signs(packed).mul_((scales / w).unsqueeze(1)).sum(dim=0)
    _zero_padding_(avg, valid)
    avg.add_(server_error)
    scale = _scales(avg.unsqueeze(0), torch.tensor([float(valid)], device=avg.device))
    out = pack_signs(avg)
    torch.sub(avg, unpack_signs(out).mul_(scale), out=server_error)
    _zero_padding_(server_error, valid)
    return out, scale


def decode_chunks(packed: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
    """All chunks decoded into one flat fp32 tensor of ``numel`` elements (padding dropped).

    ``packed`` uint8 ``[W, C / 8]``, ``scales`` fp32 ``[W]``.
    """
    return unpack_signs(packed).mul_(scales.reshape(-1, 1)).view(-1)[:numel]


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
    padded = padded_numel(numel, w)
    sent = []
    for t, we in zip(tensors, worker_errors, strict=True):
        x = torch.zeros(padded, dtype=torch.float32, device=t.device)
        x[:numel] = t.reshape(-1)
        sent.append(compress_chunks_(x, we, numel, w))
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
