"""Sharded checkpoint state: save per rank, load at any world size and stage, consolidate to full tensors.

What a rank saves (:func:`sharded_state`) is keyed by parameter *name* and by *flattened element range*,
not by rank or partition, so nothing about the saving run's world size or stage is needed to read it:

- tensors: ``"<name>/master"`` (fp32 master values) and ``"<name>/<state key>"`` (e.g. ``exp_avg``) for
  the elements ``[start, end)`` of that parameter that this rank holds;
- ``"__rank_local__/<group>/<key>"``: state the inner optimizer declares per rank (``rank_local_state``:
  onebit-comm's error-feedback buffers), saved whole by every rank and given back only at the same
  world size (``load_rank_local_state`` decides what happens elsewhere);
- metadata (JSON-able): for every parameter its group, global shape and this rank's ``[start, end)``
  (empty when it holds none), the stage, world size and rank, each group's hyperparameters and scalar
  optimizer state (Adam's ``step``), the loss scaler's state and the number of steps taken.

A stage-0 rank holds everything but saves only the range a stage-1 rank would own, so a stage-0
checkpoint is as small per rank as a stage-1 one and has the same shape.

Loading (:func:`load_sharded_state`) gathers, for the elements the loading rank needs, the overlapping
ranges from every saved rank: resharding is copying by global element offset. Same world size and stage
gives back exactly the tensors that were saved, so a resumed run continues bit for bit.

A model split over several optimizers when it was saved (pipeline stages, each with its own data-parallel
group) and split differently now: :func:`merge_shard_sets` makes one saved run, for the parameters this
optimizer holds, out of the saved groups that held them (each parameter from the first group holding it:
a tied weight exists once per stage that uses it, with the same values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from zero_shard.optimizer import ZeroShardedOptimizer

__all__ = ["FORMAT", "consolidate", "load_sharded_state", "merge_shard_sets", "sharded_state"]

FORMAT = "zero-shard/1"
RANK_LOCAL = "__rank_local__/"  # tensor-name prefix of per-rank optimizer state (never resharded)
Shard = tuple[dict[str, torch.Tensor], dict[str, Any]]


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return repr(v)


def _encode_scalar(v: Any) -> dict[str, Any]:
    if isinstance(v, torch.Tensor):
        return {"tensor": True, "dtype": str(v.dtype).removeprefix("torch."), "value": v.item()}
    return {"tensor": False, "value": _jsonable(v)}


def _decode_scalar(d: dict[str, Any], device: torch.device) -> Any:
    if d["tensor"]:
        return torch.tensor(d["value"], dtype=getattr(torch, d["dtype"]), device=device)
    return d["value"]


def _is_elementwise(v: Any) -> bool:
    # Per-element state (exp_avg, exp_avg_sq) has the master's 1-D shape; 0-d tensors are scalars (step).
    return isinstance(v, torch.Tensor) and v.dim() > 0


def sharded_state(opt: ZeroShardedOptimizer) -> Shard:
    """This rank's tensors and metadata (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    params: dict[str, dict[str, Any]] = {}
    n_groups = len(opt.inner.param_groups)
    scalars_of: list[dict[str, Any]] = [{} for _ in range(n_groups)]
    keys_of: list[set[str]] = [set() for _ in range(n_groups)]
    local_keys_of: list[set[str]] = [set() for _ in range(n_groups)]
    # One layout per param group at stages 0-2; at stage 3 one per unit, several per group.
    for li, lay in enumerate(opt.layouts):
        with opt._resident(li):  # NVMe offload: this partition's state from its swap files
            g = opt.layout_group[li]
            lo, hi = lay.partition(opt.rank)
            master = opt.masters[li].detach()
            state = opt.inner.state.get(opt.masters[li], {})
            # State that differs per rank (onebit-comm's error-feedback buffers) is saved whole, per rank.
            # (Only at stage 0, where a group has one layout: li == g.)
            local = _rank_local(opt, li)
            for k, t in local.items():
                tensors[f"{RANK_LOCAL}{g}/{k}"] = t.detach().clone()
            local_keys_of[g].update(local)
            # Stage 0 holds the whole group: save only the range this rank would own at stage 1.
            part = {"master": master[lo:hi] if opt.stage == 0 else master}
            for k, v in state.items():
                if _is_elementwise(v) and k not in local:
                    part[k] = v[lo:hi] if opt.stage == 0 else v
                elif k not in local and k not in scalars_of[g]:
                    scalars_of[g][k] = _encode_scalar(v)
            keys_of[g].update(k for k in part if k != "master")
            for slot in lay.slots:
                params[slot.name] = {"group": g, "shape": list(slot.shape), "start": 0, "end": 0}
            for i, a, b in lay.fragments(opt.rank):
                slot = lay.slots[i]
                params[slot.name].update(start=a, end=b)
                off = slot.offset + a - lo
                for k, t in part.items():
                    # Own storage, contiguous: safetensors refuses views that share memory.
                    tensors[f"{slot.name}/{k}"] = t[off : off + b - a].detach().clone()
    groups = []
    for g in range(n_groups):
        hyper = {k: _jsonable(v) for k, v in opt.inner.param_groups[g].items() if k != "params"}
        groups.append(
            {
                "hyper": hyper,
                "scalars": scalars_of[g],
                "state_keys": sorted(keys_of[g]),
                "rank_local_keys": sorted(local_keys_of[g]),
            }
        )
    meta = {
        "format": FORMAT,
        "stage": opt.stage,
        "world_size": opt.world_size,
        "rank": opt.rank,
        "compute_dtype": str(opt.compute_dtype).removeprefix("torch."),
        "optimizer": type(opt.inner).__name__,
        "params": params,
        "groups": groups,
        "loss_scaler": opt.loss_scaler.state_dict(),
        "global_steps": opt.global_steps,
    }
    return tensors, meta


def _check_shards(shards: list[Shard]) -> list[Shard]:
    if not shards:
        raise ValueError("load_sharded_state: no shards given")
    for i, (_, meta) in enumerate(shards):
        if meta.get("format") != FORMAT:
            raise ValueError(f"shard {i}: not zero-shard state (format {meta.get('format')!r}, expected {FORMAT!r})")
    world = shards[0][1]["world_size"]
    ranks = sorted(m["rank"] for _, m in shards)
    if ranks != list(range(world)):
        raise ValueError(f"need the state of every saved rank 0..{world - 1} (world size {world}); got ranks {ranks}")
    return sorted(shards, key=lambda s: s[1]["rank"])


def _index(shards: list[Shard]) -> dict[str, list[tuple[int, int, int]]]:
    """For each parameter name: ``(start, end, shard index)`` of every saved fragment."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for si, (_, meta) in enumerate(shards):
        for name, pm in meta["params"].items():
            if pm["end"] > pm["start"]:
                out.setdefault(name, []).append((pm["start"], pm["end"], si))
    return out


def _gather_range(
    shards: list[Shard],
    index: dict[str, list[tuple[int, int, int]]],
    name: str,
    key: str,
    a: int,
    b: int,
    out: torch.Tensor,
) -> None:
    """Fill ``out`` (length b - a) with elements ``[a, b)`` of ``name``'s ``key`` from the saved fragments."""
    covered = 0
    for sa, sb, si in index.get(name, []):
        x, y = max(a, sa), min(b, sb)
        if x >= y:
            continue
        t = shards[si][0].get(f"{name}/{key}")
        if t is None:
            raise KeyError(f"saved rank {si} has no tensor {name}/{key}")
        out[x - a : y - a].copy_(t[x - sa : y - sa])
        covered += y - x
    if covered != b - a:
        raise ValueError(f"saved state covers {covered} of the {b - a} elements [{a}, {b}) of {name}/{key}")


def load_sharded_state(opt: ZeroShardedOptimizer, shards: list[Shard]) -> None:
    """Load every saved rank's state into ``opt`` (collective at stages 1-2: call it on every rank)."""
    shards = _check_shards(shards)
    meta0 = shards[0][1]
    saved = meta0["params"]
    current = {s.name: (opt.layout_group[li], s) for li, lay in enumerate(opt.layouts) for s in lay.slots}
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for name, (g, slot) in current.items():
        if saved[name]["group"] != g or tuple(saved[name]["shape"]) != slot.shape:
            raise ValueError(
                f"{name}: saved as group {saved[name]['group']} shape {tuple(saved[name]['shape'])}, "
                f"model has group {g} shape {slot.shape}"
            )
    n_groups = len(opt.inner.param_groups)
    if len(meta0["groups"]) != n_groups:
        raise ValueError(f"checkpoint has {len(meta0['groups'])} param groups, the optimizer {n_groups}")
    index = _index(shards)
    # Stage 3 keeps no full 16-bit model to restart the master from: it always loads the fp32 master.
    load_master = opt.config.load_from_fp32_weights or opt.stage == 3
    dtype_cache: dict[int, dict[str, torch.dtype]] = {}
    for li, lay in enumerate(opt.layouts):
        with opt._resident(li, write=True):  # NVMe offload: loaded into memory, then into the swap files
            g = opt.layout_group[li]
            master = opt.masters[li]
            # The flat range this rank keeps: everything at stage 0, its partition otherwise.
            lo, hi = (0, lay.padded_numel) if opt.stage == 0 else lay.partition(opt.rank)
            group_meta = meta0["groups"][g]
            keys = group_meta["state_keys"]
            if g not in dtype_cache:
                probe = _any_name(
                    shards, [s for li2, l2 in enumerate(opt.layouts) if opt.layout_group[li2] == g for s in l2.slots]
                )
                dtype_cache[g] = {k: shards[0][0][f"{probe}/{k}"].dtype for k in keys} if probe is not None else {}
            dtypes = dtype_cache[g]
            new = {k: torch.zeros(hi - lo, dtype=dtypes.get(k, torch.float32), device=master.device) for k in keys}
            if load_master:
                new["master"] = torch.zeros(hi - lo, dtype=torch.float32, device=master.device)
            for slot in lay.slots:
                a, b = max(lo, slot.offset), min(hi, slot.end)
                if a >= b:
                    continue
                for k, t in new.items():
                    _gather_range(shards, index, slot.name, k, a - slot.offset, b - slot.offset, t[a - lo : b - lo])
            with torch.no_grad():
                if load_master:
                    master.copy_(new.pop("master"))
                else:
                    # DeepSpeed's load_from_fp32_weights=false: the master restarts from the (16-bit) model.
                    master.copy_(opt.flat_params[li][lo:hi].float())
            state: dict[str, Any] = dict(new)
            for k, d in group_meta["scalars"].items():
                state[k] = _decode_scalar(d, master.device)
            opt.inner.state[master] = state
            _load_rank_local(opt, shards, li, g)
    for g in range(n_groups):
        group = opt.inner.param_groups[g]
        for k, v in meta0["groups"][g]["hyper"].items():
            if k in group and isinstance(v, bool | int | float | list):
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
    opt.loss_scaler.load_state_dict(meta0["loss_scaler"])
    opt.global_steps = int(meta0.get("global_steps", 0))
    opt.reducer.zero_grad()
    if load_master:
        opt._refresh_model()


def merge_shard_sets(opt: ZeroShardedOptimizer, sets: list[list[Shard]]) -> list[Shard]:
    """One saved run holding ``opt``'s parameters, out of several saved runs that each held some of them.

    ``sets``: the shards of every saved optimizer (e.g. one list per saved pipeline stage, each complete
    over its data-parallel ranks). Each parameter comes from the first set that holds it; its group is the
    one it has in ``opt`` (the saved optimizers may have numbered their groups differently), with that
    group's hyperparameters and scalar state taken from where its first parameter came from. The result
    goes to :func:`load_sharded_state`.
    """
    sets = [_check_shards(s) for s in sets if s]
    if not sets:
        raise ValueError("merge_shard_sets: no saved optimizer state given")
    group_of = {slot.name: opt.layout_group[li] for li, lay in enumerate(opt.layouts) for slot in lay.slots}
    source: dict[str, int] = {}
    for si, shards in enumerate(sets):
        for name in shards[0][1]["params"]:
            if name in group_of:
                source.setdefault(name, si)
    missing = sorted(set(group_of) - set(source))
    if missing:
        raise ValueError(f"the saved optimizer state has no parameter named {missing[:10]} (of {len(missing)} missing)")
    n_groups = len(opt.inner.param_groups)
    groups: list[dict[str, Any] | None] = [None] * n_groups
    for name, g in group_of.items():  # in layout order: a group's first parameter decides
        if groups[g] is None:
            meta = sets[source[name]][0][1]
            groups[g] = meta["groups"][meta["params"][name]["group"]]
    used = sorted(set(source.values()))
    total = sum(len(sets[si]) for si in used)
    # Every shard's metadata lists every parameter (those it holds no element of as an empty range).
    empty = {
        n: {"group": group_of[n], "shape": sets[si][0][1]["params"][n]["shape"], "start": 0, "end": 0}
        for n, si in source.items()
    }
    out: list[Shard] = []
    for si in used:
        for tensors, meta in sets[si]:
            names = {n for n in meta["params"] if source.get(n) == si}
            params = {**empty, **{n: {**meta["params"][n], "group": group_of[n]} for n in names}}
            mine = {k: v for k, v in tensors.items() if k.rpartition("/")[0] in names}
            out.append((mine, {**meta, "params": params, "groups": groups, "rank": len(out), "world_size": total}))
    return out


def _rank_local(opt: ZeroShardedOptimizer, li: int) -> dict[str, torch.Tensor]:
    """The inner optimizer's per-rank tensors for layout ``li``'s master (none unless it declares some)."""
    get = getattr(opt.inner, "rank_local_state", None)
    return dict(get(opt.masters[li])) if get is not None else {}


def _load_rank_local(opt: ZeroShardedOptimizer, shards: list[Shard], li: int, g: int) -> None:
    """Hand this rank's saved per-rank tensors of group ``g`` back to the inner optimizer.

    Only at the saving world size (they exist once per rank); elsewhere the optimizer gets ``None``
    and decides (onebit-comm's raise a clear error rather than continue with wrong error feedback).
    """
    load = getattr(opt.inner, "load_rank_local_state", None)
    if load is None:
        return
    saved_world = int(shards[0][1]["world_size"])
    keys = list(shards[0][1]["groups"][g].get("rank_local_keys", []))
    mine = None
    if keys and saved_world == opt.world_size:
        tensors = shards[opt.rank][0]
        mine = {k: tensors[f"{RANK_LOCAL}{g}/{k}"] for k in keys}
    load(opt.masters[li], mine, saved_world, keys)


def _any_name(shards: list[Shard], slots: Any) -> str | None:
    """A parameter of this group with a saved fragment on rank 0 (to read the state dtypes from)."""
    params = shards[0][1]["params"]
    for slot in slots:
        pm = params.get(slot.name)
        if pm is not None and pm["end"] > pm["start"]:
            return slot.name
    return None


def consolidate(shards: list[Shard], key: str = "master") -> dict[str, torch.Tensor]:
    """Full tensors by parameter name from every saved rank's state (``key``: ``master``, ``exp_avg``, ...)."""
    shards = _check_shards(shards)
    index = _index(shards)
    out = {}
    for name, pm in shards[0][1]["params"].items():
        shape = tuple(pm["shape"])
        numel = 1
        for d in shape:
            numel *= d
        frag = next((shards[si][0][f"{name}/{key}"] for _, _, si in index.get(name, [])), None)
        dtype = frag.dtype if frag is not None else torch.float32
        full = torch.empty(numel, dtype=dtype)
        _gather_range(shards, index, name, key, 0, numel, full)
        out[name] = full.view(shape)
    return out
