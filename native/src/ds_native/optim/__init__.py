"""Optimizers over ds-native's kernels.

``CPUAdam``: Adam/AdamW on CPU tensors (SIMD chosen at run time, OpenMP, GIL released),
with bf16/fp16 gradients in and bf16/fp16 params out in the same pass (ZeRO-Offload's step).
``FusedAdam``: multi-tensor Adam/AdamW on CUDA tensors (loads the CUDA extension on first step).
``cpu_adam_step``: the functional CPU kernel.
"""

from __future__ import annotations

from ds_native.optim.cpu_adam import CPUAdam, cpu_adam_step
from ds_native.optim.fused_adam import FusedAdam

__all__ = ["CPUAdam", "FusedAdam", "cpu_adam_step"]
