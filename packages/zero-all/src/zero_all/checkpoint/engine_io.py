"""What an engine checkpoint holds, and how it is put back (at any world size, any stage 0-2).

Per rank: zero-shard's ``sharded_state()`` (fp32 master fragments and optimizer-state
fragments keyed by parameter name, with each parameter's global shape and flat range) and
the rank's RNG states. Once (rank 0): the module's ``state_dict`` (buffers, tied names). In
the manifest: engine counters, scheduler state, client_state, the ds_config.

Loading hands *all* saved ranks' shards to ``load_sharded_state``, which takes what this rank
needs by global offsets, so world size and stage may differ from the saving run. RNG states
are restored only at the same world size (they are per rank); the resumed run is then
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from zero_all.checkpoint.files import CheckpointError
from zero_all.checkpoint.layout import CheckpointReader, CheckpointWriter, read_latest

if TYPE_CHECKING:
    from zero_all.engine import Engine

__all__ = ["MODEL_FILE", "load_engine_checkpoint", "save_engine_checkpoint", "tied_names"]

MODEL_FILE = "model.safetensors"
_OPT = "optim/"
_RNG = "rng/"


def _check_json(client_state: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(client_state, dict):
        raise CheckpointError(f"client_state must be a dict, got {type(client_state).__name__}")
    for key, value in client_state.items():
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"client_state[{key!r}] ({type(value).__name__}) is not JSON-serialisable: zero-all checkpoints are "
                f"pickle-free, so client_state holds JSON values only (numbers, strings, lists, dicts); "
                f"convert tensors with .tolist() ({e})"
            ) from None
    return json.loads(json.dumps(client_state, allow_nan=True))


def tied_names(module: torch.nn.Module) -> dict[str, str]:
    """``{state_dict key: parameter name}`` for state_dict keys that alias another parameter (tied weights)."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for key, t in module.state_dict(keep_vars=True).items():
        name = by_id.get(id(t))
        if name is not None and name != key:
            out[key] = name
    return out


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {_RNG + "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[_RNG + "cuda"] = torch.cuda.get_rng_state()
    return out


def save_engine_checkpoint(
    engine: Engine, save_dir: str | os.PathLike[str], tag: str, client_state: dict[str, Any], save_latest: bool = True
) -> Path:
    """Every rank calls this (a collective). Returns the committed directory."""
    client_state = _check_json(client_state)
    writer = CheckpointWriter(save_dir, tag, engine.process_group)
    tensors, meta = engine.optimizer.sharded_state()
    rank_tensors = {_OPT + k: v for k, v in tensors.items()}
    rank_tensors.update(_rng_tensors())
    writer.write_rank(rank_tensors, {"optimizer": meta})
    if writer.rank == 0:
        writer.write_shared(MODEL_FILE, _module_state_to_save(engine))
    manifest = {
        "zero_stage": engine.zero_optimization_stage(),
        "engine": {
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "micro_steps": engine.micro_steps,
            "skipped_steps": engine.skipped_steps,
        },
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "client_state": client_state,
        "tied": tied_names(engine.module),
        "param_names": [n for n, _ in engine.module.named_parameters()],
        "ds_config": engine.config.raw,
        "save_latest": save_latest,
    }
    return writer.commit(manifest, update_latest=save_latest)


def load_engine_checkpoint(
    engine: Engine,
    load_dir: str | os.PathLike[str],
    tag: str | None,
    *,
    load_module_strict: bool = True,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
) -> tuple[str | None, dict[str, Any] | None]:
    """Every rank calls this. Returns ``(checkpoint path, client_state)``, or ``(None, None)`` without ``latest``."""
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            if engine.global_rank == 0:
                print(f"[zero-all] no 'latest' file in {load_dir}: nothing loaded", flush=True)
            return None, None
    reader = CheckpointReader(load_dir, tag)
    manifest = reader.manifest

    # 1. The module as saved (buffers, and the parameters in the compute dtype).
    module_state = reader.read_shared(MODEL_FILE)
    from_master = _keys_from_master(engine)
    if engine.zero_optimization_stage() == 3:
        # Partitioned parameters have no full memory to load into: their values come from the fp32 master below.
        module_state = {k: v for k, v in module_state.items() if k not in from_master}
    missing, unexpected = engine.module.load_state_dict(module_state, strict=False)
    # A stage-3 checkpoint holds no 16-bit copy of the parameters the optimizer's master covers.
    missing = [k for k in missing if k not in from_master]
    if load_module_strict and (missing or unexpected):
        raise CheckpointError(
            f"{reader.dir / MODEL_FILE} does not match the model: missing keys {sorted(missing)}, "
            f"unexpected keys {sorted(unexpected)} (pass load_module_strict=False to load what matches)"
        )

    # 2. The fp32 master weights and optimizer state, resharded to this world size / stage.
    shards = []
    for tensors, meta in reader.read_all_ranks():
        opt_tensors = {k[len(_OPT) :]: v for k, v in tensors.items() if k.startswith(_OPT)}
        shards.append((opt_tensors, meta["optimizer"]))
    if load_optimizer_states:
        engine.optimizer.load_sharded_state(shards)
    else:
        _load_master_weights_only(engine, shards)

    # 3. Schedule, counters, RNG.
    if load_lr_scheduler_states and engine.lr_scheduler is not None and manifest.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(manifest["lr_scheduler"])
    if load_optimizer_states:
        counters = manifest["engine"]
        engine.global_steps = int(counters["global_steps"])
        engine.global_samples = int(counters["global_samples"])
        engine.micro_steps = int(counters["micro_steps"])
        engine.skipped_steps = int(counters["skipped_steps"])
    world = dist.get_world_size(engine.process_group) if dist.is_initialized() else 1
    if reader.world_size == world:
        rank = dist.get_rank(engine.process_group) if dist.is_initialized() else 0
        rng, _ = reader.read_rank(rank)
        torch.set_rng_state(rng[_RNG + "cpu"])
        if _RNG + "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[_RNG + "cuda"])
    return str(reader.dir), manifest.get("client_state", {})


def _keys_from_master(engine: Engine) -> set[str]:
    """state_dict keys (tied aliases included) of the parameters whose values the optimizer's fp32 master holds."""
    managed = getattr(engine.optimizer, "managed_param_ids", lambda: set())()
    return {k for k, t in engine.module.state_dict(keep_vars=True).items() if id(t) in managed}


def _module_state_to_save(engine: Engine) -> dict[str, torch.Tensor]:
    """The module's state_dict; at stage 3 without the partitioned parameters (the master shards hold them)."""
    if engine.zero_optimization_stage() != 3:
        return engine.module.state_dict()
    skip = _keys_from_master(engine)
    return {k: v.detach() for k, v in engine.module.state_dict(keep_vars=True).items() if k not in skip}


def _load_master_weights_only(engine: Engine, shards: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> None:
    """Weights from the fp32 master copy; optimizer state and hyperparameters start fresh."""
    trimmed = []
    for tensors, meta in shards:
        meta = dict(meta)
        meta["groups"] = [{"hyper": {}, "scalars": {}, "state_keys": []} for _ in meta["groups"]]
        if hasattr(engine.optimizer, "loss_scaler"):
            meta["loss_scaler"] = engine.optimizer.loss_scaler.state_dict()
        trimmed.append(({k: v for k, v in tensors.items() if k.endswith("/master")}, meta))
    engine.optimizer.load_sharded_state(trimmed)
