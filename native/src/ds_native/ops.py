"""Torch-facing wrappers of the multi-tensor kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ds_native import _ds_native_cpu

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _check(tensors: Sequence[torch.Tensor]) -> torch.device | None:
    device = None
    for i, t in enumerate(tensors):
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"tensor {i}: dtype {t.dtype} not supported; expected one of {_SUPPORTED}")
        if not t.is_contiguous():
            raise ValueError(f"tensor {i}: must be contiguous (call .contiguous() first)")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"tensor {i}: on {t.device}, but tensor 0 is on {device}")
    return device


def multi_tensor_l2_norm(tensors: Sequence[torch.Tensor], num_threads: int | None = None) -> float:
    """Global L2 norm of many tensors in one pass, as gradient clipping needs.

    Values are squared in fp32 and accumulated in double, so the result is at
    least as accurate as ``torch.linalg.vector_norm`` over the concatenation.
    On CPU the result is bitwise independent of ``num_threads`` (default: torch's).
    """
    tensors = [t.detach() for t in tensors if t.numel() > 0]
    device = _check(tensors)
    if device is None:
        return 0.0
    if device.type == "cuda":
        from ds_native import cuda_ops

        return cuda_ops.multi_tensor_l2_norm(tensors)
    if device.type != "cpu":
        raise ValueError(f"unsupported device {device}; expected cpu or cuda")
    threads = torch.get_num_threads() if num_threads is None else num_threads
    return math.sqrt(_ds_native_cpu.multi_tensor_sum_squares(tensors, threads))
