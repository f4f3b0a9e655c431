"""``save_hf_format``: write a trained engine's model the way ``from_pretrained`` reads it.

DeepSpeed-Chat's ``save_hf_format`` (``pytorch_model.bin`` + ``config.json`` + vocab) is what
users copy today. Ours writes safetensors (no pickle) through the model's own
``save_pretrained`` (so tied weights, sharding and ``generation_config.json`` follow
transformers' rules) and the tokenizer's ``save_pretrained``.

Consolidation: at ZeRO stages 0-2 every rank's module holds the full parameters (zero-shard
all-gathers them after each step), so rank 0's ``state_dict`` *is* the consolidated model, in
the compute dtype (bf16 under bf16, as DeepSpeed's ``save_16bit_model`` writes). At stage 3
the parameters are partitioned: the state dict comes from the engine's
``_zero3_consolidated_16bit_state_dict()`` (DeepSpeed's name), a collective that gathers the
full tensors onto rank 0. Every rank must therefore call :func:`save_hf_format`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["consolidated_state_dict", "save_hf_format"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None on other ranks). Every rank must call it.

    Raises:
        NotImplementedError: at ZeRO stage 3 when the engine cannot gather its partitions.
    """
    stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
    if stage >= 3:
        gather = getattr(engine, "_zero3_consolidated_16bit_state_dict", None)
        if gather is None:
            raise NotImplementedError(
                "save_hf_format at ZeRO stage 3 needs engine._zero3_consolidated_16bit_state_dict() to gather the "
                "partitioned parameters; this engine has none"
            )
        state = gather()  # collective: every rank takes part, rank 0 gets the tensors
        return state if _rank() == 0 else None
    if _rank() != 0:
        return None
    module = getattr(engine, "module", engine)
    return {k: v.detach() for k, v in module.state_dict().items()}


def save_hf_format(
    engine: Any,
    tokenizer: Any = None,
    out_dir: str | os.PathLike[str] = "hf_model",
    *,
    sub_folder: str = "",
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write ``engine``'s model (+ ``tokenizer``) to ``out_dir/sub_folder`` for ``from_pretrained``.

    Args:
        engine: a zero-all engine (or DeepSpeed-style object with ``.module``), or a bare module.
        tokenizer: anything with ``save_pretrained`` (a transformers tokenizer); None: skip.
        out_dir, sub_folder: where to write (created).
        max_shard_size: passed to ``save_pretrained`` (large models come out as shards + index).

    Writes ``model.safetensors`` (or shards), ``config.json`` and the tokenizer's files, from
    rank 0, after every rank has contributed to consolidation; returns the folder on every rank.
    A module without ``save_pretrained`` is written as ``model.safetensors`` (+ ``config.json``
    when it has a ``config`` with ``to_dict``).
    """
    out = Path(out_dir) / sub_folder if sub_folder else Path(out_dir)
    out = out.resolve()
    state = consolidated_state_dict(engine)
    error: BaseException | None = None
    if _rank() == 0:
        try:
            _write(getattr(engine, "module", engine), state, tokenizer, out, max_shard_size)
        except Exception as e:  # noqa: BLE001  (re-raised after the all-reduce, so no rank waits for a dead writer)
            error = e
    if dist.is_initialized():
        # On the engine's device: NCCL reduces CUDA tensors only.
        flag = torch.tensor([1 if error is not None else 0], device=getattr(engine, "device", None))
        dist.all_reduce(flag)
        if error is None and int(flag.item()):
            raise RuntimeError(f"rank {_rank()}: save_hf_format failed on rank 0 while writing {out}")
    if error is not None:
        raise error
    return out


def _write(
    module: torch.nn.Module, state: dict[str, torch.Tensor] | None, tokenizer: Any, out: Path, shard: Any
) -> None:
    assert state is not None
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(out, state_dict=state, max_shard_size=shard)
    else:
        from safetensors.torch import save_file

        # safetensors refuses tensors that share storage (tied weights): write each once.
        seen: dict[int, str] = {}
        unique = {}
        for key, t in state.items():
            ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if ptr in seen:
                continue
            seen[ptr] = key
            unique[key] = t.contiguous().cpu()
        save_file(unique, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
