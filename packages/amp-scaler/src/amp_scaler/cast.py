"""``fp16.auto_cast``: cast the floating-point tensors in a model's inputs to the training dtype."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["cast_floating"]


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor cast to ``dtype``, through lists, tuples and dicts.

    Integer tensors (token ids, labels) and non-tensors are returned unchanged, as DeepSpeed's
    ``auto_cast`` does for the inputs of the engine's forward.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return type(obj)((k, cast_floating(v, dtype)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(cast_floating(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floating(v, dtype) for v in obj)
    return obj
