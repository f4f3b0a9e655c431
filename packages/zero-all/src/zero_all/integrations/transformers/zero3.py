"""ZeRO-3 model loading: a Hugging Face model built partitioned, then filled from its checkpoint.

transformers' ``from_pretrained`` builds the model partitioned only for DeepSpeed: it asks
``is_deepspeed_zero3_enabled()`` and then imports ``deepspeed`` for ``deepspeed.zero.Init``
and its own gather-and-copy loader. Rather than make that check answer for zero-all (which
would send transformers into ``import deepspeed``), :func:`from_pretrained_zero3` does the
same two steps with zero-all's pieces: the model is built under ``zero_all.zero.Init`` (each
module's parameters partitioned as its ``__init__`` returns, so no rank ever holds the whole
model), and the checkpoint's tensors are copied in one module at a time inside
``GatheredParameters(modifier_rank=0)`` (rank 0 reads, every rank receives its shard).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["from_pretrained_zero3"]


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(
        f"from_pretrained_zero3({str(path)!r}): no model.safetensors or model.safetensors.index.json there "
        "(zero-all reads safetensors checkpoints only; it never unpickles .bin files)"
    )


class _Reader:
    """The checkpoint's tensors by name, read lazily from its safetensors files."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118  (safe_open has no __iter__)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def from_pretrained_zero3(model_cls: Any, path: str, *, dtype: torch.dtype | None = None, **config_kwargs: Any) -> Any:
    """``model_cls.from_pretrained(path)`` for ZeRO stage 3: built partitioned, weights loaded into the partitions.

    ``model_cls`` is a transformers model class (``LlamaForCausalLM``, ``AutoModelForCausalLM``...);
    ``dtype`` casts the floating-point weights as they load; ``config_kwargs`` go to
    ``AutoConfig.from_pretrained``. Every rank must call it. Pass the result to a stage-3
    ``ZeroAllTrainer`` / ``initialize()``. Checkpoint keys must match the model's parameter names as
    ``save_pretrained`` writes them; a missing or unexpected key is an error naming it.
    """
    from transformers import AutoConfig

    from zero_all.zero import GatheredParameters, Init

    folder = Path(path)
    config = AutoConfig.from_pretrained(str(folder), **config_kwargs)
    # Auto classes build with from_config, model classes with _from_config (the same path underneath).
    build = model_cls.from_config if hasattr(model_cls, "from_config") else model_cls._from_config
    with Init(dtype=dtype):
        model = build(config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    reader = _Reader(_checkpoint_files(folder)) if rank == 0 else None
    wanted: set[str] = set()
    loaded: set[int] = set()
    for prefix, module in model.named_modules():
        named = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        wanted.update(n for n, _ in named)
        # A tied weight (lm_head = embed_tokens) is loaded once, under the first name that holds it:
        # save_pretrained writes only that one.
        params = [(n, p) for n, p in named if id(p) not in loaded]
        loaded.update(id(p) for _, p in params)
        names = [n for n, _ in params]
        if params:
            with GatheredParameters([p for _, p in params], modifier_rank=0):
                if reader is not None:
                    for name, (_, p) in zip(names, params, strict=True):
                        _copy(p, reader, name, folder)
        for n, buf in module.named_buffers(recurse=False):
            name = f"{prefix}.{n}" if prefix else n
            if reader is not None and buf is not None and name in reader:
                buf.data.copy_(reader.get(name).to(buf.dtype))
    # Buffers are not partitioned: give every rank rank 0's (persistent) values.
    if dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)
    if reader is not None:
        unexpected = reader.names() - wanted - {k for k, _ in model.named_buffers()}
        if unexpected:
            raise KeyError(
                f"from_pretrained_zero3({str(folder)!r}): keys the model does not have: {sorted(unexpected)}"
            )
    model.eval()
    return model


def _copy(param: torch.nn.Parameter, reader: _Reader, name: str, folder: Path) -> None:
    if name not in reader:
        raise KeyError(f"from_pretrained_zero3({str(folder)!r}): the checkpoint has no {name!r}")
    value = reader.get(name)
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"from_pretrained_zero3({str(folder)!r}): {name} has shape {tuple(value.shape)} in the checkpoint, "
            f"{tuple(param.shape)} in the model"
        )
    with torch.no_grad():
        param.data.copy_(value.to(param.dtype))
