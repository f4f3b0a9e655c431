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


def fused_adam(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    device: torch.device,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw_mode: bool,
    bias_correction: bool,
) -> None:
    """Multi-tensor Adam/AdamW step in place on the current stream of ``device`` (see FusedAdam)."""
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):  # the launch goes to the current device
        _ds_native_cuda.fused_adam(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            adamw_mode,
            bias_correction,
            step,
            stream,
        )
