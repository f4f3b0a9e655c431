"""CUDA kernels; importing this module loads the CUDA extension."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

try:
    from ds_native import _ds_native_cuda
except ImportError as exc:  # built without CUDA
    raise ImportError(
        "ds-native was built without its CUDA extension (no nvcc at build time, or "
        "DS_NATIVE_CUDA=OFF). Rebuild on a machine with the CUDA toolkit: `uv pip install ./native`."
    ) from exc


def multi_tensor_l2_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Global L2 norm of contiguous CUDA tensors on the current stream."""
    device = tensors[0].device
    partials = torch.empty(
        _ds_native_cuda.partials_needed([t.numel() for t in tensors]), dtype=torch.float64, device=device
    )
    stream = torch.cuda.current_stream(device).cuda_stream
    written = _ds_native_cuda.multi_tensor_sum_squares(list(tensors), partials, stream)
    return math.sqrt(partials[:written].sum().item())
