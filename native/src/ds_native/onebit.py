"""Torch-facing wrappers of the fused 1-bit compression kernels (onebit-comm's compressed all-reduce).

Each function is one pass over its buffers, OpenMP threads over 64 Ki-element pieces, and does per
element the same IEEE operations as the torch implementation in ``onebit_comm.compress``, so its
results are bitwise equal to it (tested there). Sums of squares are :func:`sum_squares`'s: fp32
squares added in a fixed order inside 1 Ki-element blocks (64 lanes, then a pairwise fold), block
sums added in double over 64 Ki-element pieces from the start of each row, piece partials added in
order; so they depend neither on the thread count nor on the ISA (scalar, AVX2 and AVX-512 give the
same bits).

Layout: a flat fp32 buffer viewed as ``rows`` rows of ``row_len`` elements (a multiple of 8); signs
packed 8 per byte, most significant bit first, bit 1 for ``x >= 0``; one fp32 scale per row. A
"bits" argument is a uint8 tensor ``[rows, >= row_len / 8]`` whose rows may be longer than the sign
bytes (a message row: sign bytes, then the scale's 4 bytes): only its row stride matters.

Deferred error updates (:func:`compress_deferred_`, :func:`server_deferred_`, :func:`settle_`): an
error buffer may be left holding the compensated values ``c`` it compressed, with the scales that
turn them into the errors (``c - scale * sign(c)``, zero past each row's valid count) kept by the
caller; the next call applies them in the same pass that reads the buffer. Each buffer then crosses
memory once per call instead of twice, and the values, sums and signs are bitwise those of the exact
functions (``pack_`` and friends) on the settled buffer.

CPU tensors only; the caller (onebit-comm) uses torch ops on other devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ds_native import _ds_native_cpu

__all__ = [
    "available",
    "compensate_",
    "compress_deferred_",
    "decode",
    "pack_",
    "server_accumulate_",
    "server_deferred_",
    "server_pack_",
    "server_sum_squares",
    "settle_",
    "sum_squares",
]

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # ds::DType


def available() -> bool:
    """Whether this build of ds-native has the 1-bit kernels."""
    return hasattr(_ds_native_cpu, "onebit_settle")


def _threads(num_threads: int | None) -> int:
    return torch.get_num_threads() if num_threads is None else int(num_threads)


def _check(t: torch.Tensor, name: str, dtype: torch.dtype | None, numel: int | None = None) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"ds_native.onebit: {name} must be a CPU tensor, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"ds_native.onebit: {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"ds_native.onebit: {name} must be contiguous")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"ds_native.onebit: {name} must have {numel} elements, got {t.numel()}")


def _check_bits(bits: torch.Tensor, rows: int, row_len: int) -> int:
    """Validate a ``[rows, >= row_len/8]`` uint8 view with unit inner stride; returns its row stride."""
    if bits.device.type != "cpu" or bits.dtype != torch.uint8 or bits.dim() != 2:
        raise ValueError("ds_native.onebit: bits must be a 2-D uint8 CPU tensor")
    if bits.shape[0] != rows or bits.shape[1] < row_len // 8 or (bits.shape[1] > 1 and bits.stride(1) != 1):
        raise ValueError(
            f"ds_native.onebit: bits must be [{rows}, >= {row_len // 8}] with unit inner stride, "
            f"got {list(bits.shape)} strides {bits.stride()}"
        )
    return bits.stride(0) if rows > 1 else row_len // 8


def _check_server(
    bits: torch.Tensor, scales: Sequence[float], server_err: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[int, int]:
    """Validate the arguments every server-side kernel takes; returns ``(C, bits' row stride)``.

    ``server_err`` fp32 ``[C]``, ``bits`` uint8 ``[len(scales), >= C/8]``, ``out`` (if given) uint8 ``[1, >= C/8]``.
    """
    _check(server_err, "server_err", torch.float32)
    c = server_err.numel()
    stride = _check_bits(bits, len(scales), c)
    if out is not None:
        _check_bits(out, 1, c)
    return c, stride


def sum_squares(x: torch.Tensor, num_threads: int | None = None) -> float:
    """Sum of squares of a contiguous CPU fp32/bf16/fp16 tensor (fp32 squares, fixed-order sums).

    Bitwise what the fused kernels compute for one row (the order is in the module docstring);
    bf16/fp16 values are widened to fp32 first (exactly).
    """
    _check(x, "x", None)
    if x.dtype != torch.float32:
        if x.dtype not in _DTYPE_CODE:
            raise TypeError(f"ds_native.onebit.sum_squares: x must be fp32, bf16 or fp16, got {x.dtype}")
        x = x.float()
    return _ds_native_cpu.onebit_sum_squares(x.data_ptr(), x.numel(), _threads(num_threads)) if x.numel() else 0.0


def compensate_(
    x: torch.Tensor, err: torch.Tensor, rows: int, num_threads: int | None = None, *, out: torch.Tensor | None = None
) -> list[float]:
    """``err[:x.numel()] += x`` (x fp32/bf16/fp16, contiguous), then each row's sum of squares of ``err``.

    ``err`` is fp32 ``[rows * row_len]``, contiguous. With ``out`` (uint8 ``[rows, >= row_len/8]``) also
    each row's signs, which need no scale: :func:`settle_` with the scales then does the error update
    (together bitwise :func:`pack_`), so the signs can be sent before it.
    """
    _check(x, "x", None)
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"ds_native.onebit.compensate_: x must be fp32, bf16 or fp16, got {x.dtype}")
    _check(err, "err", torch.float32)
    if err.numel() % rows or x.numel() > err.numel():
        raise ValueError(f"ds_native.onebit.compensate_: err ({err.numel()}) must be rows x row_len >= x.numel()")
    row_len = err.numel() // rows
    stride = _check_bits(out, rows, row_len) if out is not None else 0
    return _ds_native_cpu.onebit_compensate(
        x.data_ptr(),
        _DTYPE_CODE[x.dtype],
        err.data_ptr(),
        x.numel(),
        rows,
        row_len,
        _threads(num_threads),
        out.data_ptr() if out is not None else 0,
        stride,
    )


def pack_(
    err: torch.Tensor,
    rows: int,
    out: torch.Tensor,
    scales: Sequence[float],
    valid: Sequence[int],
    num_threads: int | None = None,
) -> None:
    """Per row ``j`` of ``err`` (fp32 ``[rows * row_len]``): its signs into ``out[j]``, then
    ``err_j -= scales[j] * sign`` and ``err_j[valid[j]:] = 0``. ``out``: uint8 ``[rows, >= row_len/8]``."""
    _check(err, "err", torch.float32)
    row_len = err.numel() // rows
    if len(scales) != rows or len(valid) != rows:
        raise ValueError("ds_native.onebit.pack_: one scale and one valid count per row")
    stride = _check_bits(out, rows, row_len)
    _ds_native_cpu.onebit_pack(
        err.data_ptr(), rows, row_len, out.data_ptr(), stride, list(scales), list(valid), _threads(num_threads)
    )


def server_accumulate_(
    bits: torch.Tensor, scales: Sequence[float], server_err: torch.Tensor, valid: int, num_threads: int | None = None
) -> float:
    """``server_err += sum_r scales[r] * sign(bits[r])`` (rows added in order; zero past ``valid``).

    ``bits`` uint8 ``[W, >= C/8]``, ``server_err`` fp32 ``[C]``. Returns the sum of squares of ``server_err``.
    """
    c, stride = _check_server(bits, scales, server_err)
    return _ds_native_cpu.onebit_server(
        bits.data_ptr(),
        stride,
        list(scales),
        server_err.data_ptr(),
        c,
        int(valid),
        _threads(num_threads),
    )


def server_sum_squares(
    bits: torch.Tensor,
    scales: Sequence[float],
    server_err: torch.Tensor,
    valid: int,
    num_threads: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> float:
    """Read-only first pass of the server side: the sum of squares of ``server_err + avg``.

    ``avg`` as in :func:`server_accumulate_`; ``server_err`` is not written. With the scale computed
    from it, :func:`server_pack_` makes the second pass. Together they equal
    ``server_accumulate_`` then ``pack_``, bit for bit, but write ``server_err`` once instead of twice.
    With ``out`` (uint8 ``[1, >= C/8]``) this pass also writes the signs (they need no scale).
    """
    c, stride = _check_server(bits, scales, server_err, out)
    return _ds_native_cpu.onebit_server_sum_squares(
        bits.data_ptr(),
        stride,
        list(scales),
        server_err.data_ptr(),
        c,
        int(valid),
        _threads(num_threads),
        out.data_ptr() if out is not None else 0,
    )


def server_pack_(
    bits: torch.Tensor,
    scales: Sequence[float],
    server_err: torch.Tensor,
    valid: int,
    out: torch.Tensor,
    scale: float,
    num_threads: int | None = None,
) -> None:
    """Second pass of the server side: ``server_err += avg``, then ``pack_(server_err, 1, out, [scale], [valid])``.

    ``out``: uint8 ``[1, >= C/8]``; ``scale`` the fp32 scale from :func:`server_sum_squares`'s sum.
    """
    c, stride = _check_server(bits, scales, server_err, out)
    _ds_native_cpu.onebit_server_pack(
        bits.data_ptr(),
        stride,
        list(scales),
        server_err.data_ptr(),
        c,
        int(valid),
        out.data_ptr(),
        float(scale),
        _threads(num_threads),
    )


def compress_deferred_(
    x: torch.Tensor,
    err: torch.Tensor,
    rows: int,
    out: torch.Tensor,
    prev: Sequence[float] | None,
    valid: Sequence[int],
    num_threads: int | None = None,
) -> list[float]:
    """Worker side in one pass: settle ``err`` with ``prev`` (one scale per row; None: ``err`` holds errors),
    add ``x`` (as :func:`compensate_`), write each row's signs into ``out`` (uint8 ``[rows, >= row_len/8]``).

    Leaves ``err`` holding the compensated values; returns each row's sum of squares of them. The
    caller keeps the scales it derives from those sums: they are the next call's ``prev``.
    """
    _check(x, "x", None)
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"ds_native.onebit.compress_deferred_: x must be fp32, bf16 or fp16, got {x.dtype}")
    _check(err, "err", torch.float32)
    if err.numel() % rows or x.numel() > err.numel():
        raise ValueError(
            f"ds_native.onebit.compress_deferred_: err ({err.numel()}) must be rows x row_len >= x.numel()"
        )
    row_len = err.numel() // rows
    stride = _check_bits(out, rows, row_len)
    if len(valid) != rows:
        raise ValueError("ds_native.onebit.compress_deferred_: one valid count per row")
    return _ds_native_cpu.onebit_compress_deferred(
        x.data_ptr(),
        _DTYPE_CODE[x.dtype],
        err.data_ptr(),
        x.numel(),
        rows,
        row_len,
        out.data_ptr(),
        stride,
        [] if prev is None else list(prev),
        list(valid),
        _threads(num_threads),
    )


def server_deferred_(
    bits: torch.Tensor,
    scales: Sequence[float],
    server_err: torch.Tensor,
    valid: int,
    out: torch.Tensor,
    prev: float | None,
    num_threads: int | None = None,
) -> float:
    """Server side in one pass: settle ``server_err`` with ``prev`` (None: it holds errors), add the average
    (as :func:`server_accumulate_`), write its signs into ``out`` (uint8 ``[1, >= C/8]``).

    Leaves ``server_err`` holding the compensated values; returns their sum of squares.
    """
    c, stride = _check_server(bits, scales, server_err, out)
    return _ds_native_cpu.onebit_server_deferred(
        bits.data_ptr(),
        stride,
        list(scales),
        server_err.data_ptr(),
        c,
        int(valid),
        out.data_ptr(),
        [] if prev is None else [float(prev)],
        _threads(num_threads),
    )


def settle_(
    err: torch.Tensor, rows: int, scales: Sequence[float], valid: Sequence[int], num_threads: int | None = None
) -> None:
    """Apply deferred updates: per row ``j``, ``err_j -= scales[j] * sign(err_j)`` and ``err_j[valid[j]:] = 0``
    (the error update of :func:`pack_`, without its signs)."""
    _check(err, "err", torch.float32)
    if err.numel() % rows or len(scales) != rows or len(valid) != rows:
        raise ValueError("ds_native.onebit.settle_: err must be rows x row_len, one scale and one valid count per row")
    _ds_native_cpu.onebit_settle(
        err.data_ptr(), rows, err.numel() // rows, list(scales), list(valid), _threads(num_threads)
    )


def decode(
    bits: torch.Tensor, scales: Sequence[float], row_len: int, out: torch.Tensor, num_threads: int | None = None
) -> torch.Tensor:
    """``out`` (fp32, contiguous, at most ``W * row_len`` elements) := ``scales[j] * sign`` of row ``j``'s bits."""
    _check(out, "out", torch.float32)
    stride = _check_bits(bits, len(scales), row_len)
    if out.numel() > len(scales) * row_len:
        raise ValueError(f"ds_native.onebit.decode: out has {out.numel()} elements, more than W x row_len")
    _ds_native_cpu.onebit_decode(
        bits.data_ptr(), stride, list(scales), row_len, out.data_ptr(), out.numel(), _threads(num_threads)
    )
    return out
