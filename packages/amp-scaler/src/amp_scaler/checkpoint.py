"""Pickle-free state: split a nested state dict into flat tensors + a JSON-able skeleton, and back.

``split_tensors(state)`` walks dicts, lists and tuples; every tensor is moved to a flat
``{"path/to/it": tensor}`` dict (what safetensors stores) and replaced in the skeleton by
``{"__tensor__": "path/to/it"}``. Dicts with non-string keys (a torch optimizer's ``state``
is keyed by parameter index) are recorded as ``{"__keys__": [...], "__values__": [...]}``
so the keys come back with their types. ``merge_tensors(tensors, meta)`` rebuilds the state.
Tuples come back as lists (JSON has no tuple), which torch optimizers accept for ``betas``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["merge_tensors", "split_tensors"]

_SCALARS = (str, int, float, bool, type(None))


def split_tensors(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, meta)``: every tensor of ``state`` in a flat dict, the rest JSON-able.

    Raises ``TypeError`` naming the path of any value that is neither a tensor, a JSON scalar,
    a dict, a list nor a tuple (it could not be saved without pickle).
    """
    tensors: dict[str, torch.Tensor] = {}
    meta = _split(state, prefix.rstrip("/"), tensors)
    return tensors, meta


def _split(obj: Any, path: str, out: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        # safetensors wants contiguous, non-shared storage.
        out[key] = obj.detach().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}  # JSON has no inf/nan
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _split(v, f"{path}/{k}" if path else k, out) for k, v in obj.items()}
        keys = list(obj)
        for k in keys:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"split_tensors: key {k!r} at '{path}' is neither str nor int")
        values = [_split(obj[k], f"{path}/{k}" if path else str(k), out) for k in keys]
        return {"__keys__": keys, "__values__": values}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{path}/{i}" if path else str(i), out) for i, v in enumerate(obj)]
    raise TypeError(f"split_tensors: value at '{path}' of type {type(obj).__name__} is not saveable without pickle")


def merge_tensors(tensors: dict[str, torch.Tensor], meta: Any) -> Any:
    """Inverse of :func:`split_tensors`; a missing tensor is a ``KeyError`` naming its path."""
    if isinstance(meta, dict):
        if set(meta) == {"__tensor__"}:
            key = meta["__tensor__"]
            if key not in tensors:
                raise KeyError(f"merge_tensors: tensor '{key}' is missing from the saved tensors")
            return tensors[key]
        if set(meta) == {"__float__"}:
            return float(meta["__float__"])
        if set(meta) == {"__dtype__"}:
            return getattr(torch, meta["__dtype__"])
        if set(meta) == {"__keys__", "__values__"}:
            return {k: merge_tensors(tensors, v) for k, v in zip(meta["__keys__"], meta["__values__"], strict=True)}
        return {k: merge_tensors(tensors, v) for k, v in meta.items()}
    if isinstance(meta, list):
        return [merge_tensors(tensors, v) for v in meta]
    return meta
