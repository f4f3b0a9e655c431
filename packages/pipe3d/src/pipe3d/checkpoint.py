"""Pipeline checkpoints: one safetensors file per layer, a layer → stage map, optimizer state per rank.

Layout of ``save_dir/tag/`` (DeepSpeed's naming, safetensors instead of pickles)::

    pipeline.json                                  layer → stage map, stages, topology, tied keys, client meta
    layer_03-model_00-model_states.safetensors     layer 3's state_dict (tensor-parallel rank 00)
    tied_embed-model_00-model_states.safetensors   a tied module, written by the first stage using it
    optim-pipe_01-data_00-model_00.safetensors     an optimizer's per-rank tensors (+ .json metadata)

Layers are stored by their global index, so a checkpoint loads into *any* pipeline split of the
same layer list: each stage reads the files of the layers it holds now. Layer files are written
by data-parallel rank 0 of each stage. Optimizer state is per rank. When the layer → stage map is
unchanged :func:`load_pipeline_checkpoint` returns this stage's shards (the data-parallel size may
differ: zero-shard re-shards); with another split it returns none, and
:func:`load_optimizer_shard_sets` gives the shards of every saved stage instead, from which the
optimizer takes each parameter's state by name (zero-shard's ``merge_shard_sets``).

Writes go to a temporary name and are renamed into place; ``latest`` is written by global rank 0
after a barrier, once every rank's files are complete. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipe3d.module import PipelineModule

__all__ = ["load_optimizer_shard_sets", "load_pipeline_checkpoint", "read_latest", "save_pipeline_checkpoint"]

MANIFEST = "pipeline.json"


def _coord(module: PipelineModule) -> tuple[int, int, int]:
    grid = module.mpu()
    if grid is None:
        return 0, 0, 0
    return grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_slice_parallel_rank()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # safetensors refuses shared or non-contiguous storage: store plain copies.
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _layer_file(idx: int, tp: int) -> str:
    return f"layer_{idx:02d}-model_{tp:02d}-model_states.safetensors"


def _tied_file(key: str, tp: int) -> str:
    return f"tied_{key}-model_{tp:02d}-model_states.safetensors"


def _optim_file(stage: int, dp: int, tp: int) -> str:
    return f"optim-pipe_{stage:02d}-data_{dp:02d}-model_{tp:02d}"


def read_latest(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag in ``load_dir/latest``, None without one."""
    p = Path(load_dir) / "latest"
    return p.read_text().strip() if p.exists() else None


def save_pipeline_checkpoint(
    module: PipelineModule,
    save_dir: str | os.PathLike[str],
    tag: str,
    *,
    optimizer_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    save_latest: bool = True,
) -> Path:
    """Write this rank's part of a pipeline checkpoint (every rank calls it: it ends with a barrier).

    ``optimizer_state``: this rank's ``(tensors, JSON metadata)`` (zero-shard's ``sharded_state()``).
    ``meta``: JSON data stored in the manifest (engine counters, scheduler state, client state).
    """
    if not tag or "/" in tag or tag in (".", ".."):
        raise ValueError(f"checkpoint tag must be a plain name, got {tag!r}")
    out = Path(save_dir) / tag
    out.mkdir(parents=True, exist_ok=True)
    stage, dp, tp = _coord(module)
    if dp == 0:
        for idx, layer in module.layer_modules().items():
            _save_tensors(out / _layer_file(idx, tp), layer.state_dict())
        tied_stages = module.tied_stages()
        for key, tied in module.tied_modules.items():
            if tied_stages[key][0] == stage:
                _save_tensors(out / _tied_file(key, tp), tied.state_dict())
    if optimizer_state is not None:
        tensors, opt_meta = optimizer_state
        name = _optim_file(stage, dp, tp)
        _save_tensors(out / f"{name}.safetensors", tensors)
        _save_json(out / f"{name}.json", opt_meta)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        topo = module.topology()
        _save_json(
            out / MANIFEST,
            {
                "num_layers": len(module._layer_specs),
                "num_stages": module.num_stages,
                "num_chunks": module.num_chunks,
                "parts": module.parts,
                "layer_to_stage": {str(k): v for k, v in module.layer_to_stage().items()},
                "topology": dict(zip(topo.get_axis_names(), topo.dims, strict=True)),
                "tied_stages": module.tied_stages(),
                "meta": meta or {},
            },
        )
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and save_latest:
        tmp = Path(save_dir) / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, Path(save_dir) / "latest")
    if dist.is_initialized():
        dist.barrier()
    return out


def load_pipeline_checkpoint(
    module: PipelineModule, load_dir: str | os.PathLike[str], tag: str | None = None, strict: bool = True
) -> tuple[dict[str, Any], list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None]:
    """Load this stage's layers (from any saved split); return (manifest, optimizer shards or None).

    The optimizer shards are those of every saved data-parallel rank of this rank's stage and
    tensor-parallel rank, when the saved layer → stage map equals the current one; None otherwise.
    """
    tag = tag if tag is not None else read_latest(load_dir)
    if tag is None:
        raise FileNotFoundError(f"no 'latest' file in {load_dir}; pass tag=")
    src = Path(load_dir) / tag
    manifest_path = src / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} is missing: not a pipeline checkpoint (or not complete)")
    manifest = json.loads(manifest_path.read_text())
    if manifest["num_layers"] != len(module._layer_specs):
        raise ValueError(
            f"{src}: saved {manifest['num_layers']} layers, the PipelineModule has {len(module._layer_specs)}"
        )
    stage, _, tp = _coord(module)
    for idx, layer in module.layer_modules().items():
        path = src / _layer_file(idx, tp)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (layer {idx}, tensor-parallel rank {tp})")
        missing, unexpected = layer.load_state_dict(load_file(str(path)), strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"{path}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
    for key, tied in module.tied_modules.items():
        path = src / _tied_file(key, tp)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (tied module {key!r})")
        tied.load_state_dict(load_file(str(path)), strict=strict)
    same_split = manifest["layer_to_stage"] == {str(k): v for k, v in module.layer_to_stage().items()}
    if not same_split:
        return manifest, None
    shards = []
    dp_saved = manifest["topology"].get("data", 1)
    for d in range(dp_saved):
        name = _optim_file(stage, d, tp)
        if not (src / f"{name}.safetensors").exists():
            return manifest, None
        shards.append((load_file(str(src / f"{name}.safetensors")), json.loads((src / f"{name}.json").read_text())))
    return manifest, shards


def load_optimizer_shard_sets(
    module: PipelineModule, load_dir: str | os.PathLike[str], tag: str | None = None
) -> list[list[tuple[dict[str, torch.Tensor], dict[str, Any]]]] | None:
    """The optimizer shards of every saved stage (each over all its data-parallel ranks), for this
    tensor-parallel rank; None when the checkpoint holds no optimizer state.

    For loading at another layer → stage split: the parameters keep their names (global layer
    indices), so each stage finds its parameters' state among the saved stages' shards.
    """
    tag = tag if tag is not None else read_latest(load_dir)
    if tag is None:
        raise FileNotFoundError(f"no 'latest' file in {load_dir}; pass tag=")
    src = Path(load_dir) / tag
    manifest = json.loads((src / MANIFEST).read_text())
    topo = manifest["topology"]
    _, _, tp = _coord(module)
    grid = module.mpu()
    tp_now = grid.get_slice_parallel_world_size() if grid is not None else 1
    if int(topo.get("model", 1)) != tp_now:
        raise ValueError(
            f"{src}: saved with tensor-parallel size {topo.get('model', 1)}, now {tp_now}: optimizer state (and "
            "the per-rank layer files) load only at the same tensor-parallel size"
        )
    sets = []
    for stage in range(int(manifest["num_stages"])):
        shards = []
        for d in range(int(topo.get("data", 1))):
            name = _optim_file(stage, d, tp)
            if not (src / f"{name}.safetensors").exists():
                return None
            shards.append((load_file(str(src / f"{name}.safetensors")), json.loads((src / f"{name}.json").read_text())))
        sets.append(shards)
    return sets
