"""The whole model out of a running engine: ``engine.consolidated_state_dict()`` and ``save_16bit_model``.

At stages 0-2 every rank holds the whole model, so this is ``module.state_dict()``. At stage 3 the
parameters are partitioned: rank 0 assembles the state dict by gathering one unit at a time (every rank
joins each gather, in the same order) and copying it out, so no rank ever holds more than the result plus
one module's parameters. The file is written like every checkpoint file: to a temporary name, fsynced,
renamed into place, so a crash never leaves half a model under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from zero_all.checkpoint.files import CheckpointError, fsync_dir, write_tensors

if TYPE_CHECKING:
    from zero_all.engine import Engine

__all__ = ["consolidated_state_dict", "save_16bit_model"]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def consolidated_state_dict(engine: Engine, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The model's full state_dict on rank 0, None elsewhere (a collective at stage 3)."""
    from zero_shard import GatheredParameters

    module = engine.module
    rank = _rank()
    units = getattr(engine.optimizer, "units", None)
    if engine.zero_optimization_stage() != 3 or not units:
        if rank != 0:
            return None
        state = module.state_dict()
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    by_id: dict[int, torch.Tensor] = {}
    for unit in units:
        with GatheredParameters(unit.params):
            if rank == 0:
                for p in unit.params:
                    value = p.detach()
                    by_id[id(p)] = (value.to(dtype) if dtype is not None else value).clone().cpu()
    if rank != 0:
        return None
    out: dict[str, torch.Tensor] = {}
    for key, t in module.state_dict(keep_vars=True).items():
        if id(t) in by_id:
            out[key] = by_id[id(t)]
        else:
            value = t.detach()
            out[key] = (value.to(dtype) if dtype is not None and value.is_floating_point() else value).cpu()
    return out


def save_16bit_model(engine: Engine, save_dir: str | os.PathLike[str], save_filename: str) -> bool:
    """``engine.save_16bit_model``: see its docstring. Returns whether a file was written."""
    if engine.zero_optimization_stage() == 3 and not engine.config.zero_optimization.gather_16bit_weights_on_model_save:
        if _rank() == 0:
            print(
                "[zero-all] save_16bit_model: nothing saved, because zero_optimization."
                "stage3_gather_16bit_weights_on_model_save is false (as DeepSpeed). Set it to true, or use "
                "engine.save_checkpoint() and `zero-all consolidate`.",
                flush=True,
            )
        return False
    state = consolidated_state_dict(engine)
    if _rank() != 0:
        return True
    assert state is not None
    directory = Path(save_dir)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / save_filename
    tmp = directory / f".{save_filename}.tmp-{os.getpid()}"
    try:
        write_tensors(tmp, state, metadata={"format": "pt", "producer": "zero-all save_16bit_model"})
        os.replace(tmp, final)
        fsync_dir(directory)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"save_16bit_model: could not write {final}: {e}") from e
    return True
