"""``zero.Init`` (build a model already partitioned), ``GatheredParameters`` and ``register_external_parameter``.

[Note: how Init partitions] Inside the context every ``nn.Module`` subclass's ``__init__`` is wrapped:
when a module's own ``__init__`` returns, its direct parameters (initialised by then, ``reset_parameters``
included) are split 1/N across the data-parallel ranks and only this rank's piece is kept, so a model is
never whole in memory; at most one module's parameters are. A later ``module.apply(fn)`` (the way
``_init_weights`` re-initialises a finished model) runs ``fn`` with each module's parameters gathered, and
every rank keeps its piece of what ``fn`` wrote. As with DeepSpeed, ranks must build the model with the
same seed, since each keeps its piece of its own initialisation.

A partitioned parameter has ``param.data`` empty (shape ``[0]``), its full shape in ``param.ds_shape``,
its element count in ``param.ds_numel`` (DeepSpeed's names, which scripts and transformers read) and its
piece in ``param.ds_tensor``. ``initialize()`` at stage 3 then lays the parameters out in units; stages
0-2 (and anything else) first gather them back with :func:`materialize_partitioned`.

``GatheredParameters(params, modifier_rank=None)`` gathers parameters for reading (every rank must enter
it with the same parameters: it is a collective); with ``modifier_rank`` that rank's changes are broadcast
on exit and written back into every rank's partition, including the optimizer's fp32 master.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zero_shard.comm import all_gather_single

__all__ = ["GatheredParameters", "Init", "materialize_partitioned", "register_external_parameter"]


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _is_partitioned(p: torch.Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None and getattr(p, "_zero3_unit", None) is None


def _partition_param(p: nn.Parameter, group: dist.ProcessGroup | None) -> None:
    """Keep this rank's 1/N piece of ``p`` (flattened, padded); ``p.data`` becomes empty."""
    if _is_partitioned(p) or getattr(p, "_zero3_unit", None) is not None:
        return
    rank, world = _world(group)
    numel = p.numel()
    piece = -(-numel // world) if numel else 0
    flat = p.detach().reshape(-1)
    mine = torch.zeros(piece, dtype=p.dtype, device=p.device)
    lo, hi = min(numel, rank * piece), min(numel, (rank + 1) * piece)
    mine[: hi - lo].copy_(flat[lo:hi])
    p.ds_shape = tuple(p.shape)  # type: ignore[attr-defined]
    p.ds_numel = numel  # type: ignore[attr-defined]
    p.ds_tensor = mine  # type: ignore[attr-defined]
    p._zero3_group = group  # type: ignore[attr-defined]
    p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def _unpartition_param(p: nn.Parameter) -> None:
    """Gather ``p``'s pieces from every rank back into a whole parameter (a collective)."""
    group = getattr(p, "_zero3_group", None)
    _, world = _world(group)
    piece = p.ds_tensor  # type: ignore[attr-defined]
    full = torch.empty(piece.numel() * world, dtype=piece.dtype, device=piece.device)
    if world > 1:
        all_gather_single(full, piece, group)
    else:
        full.copy_(piece)
    p.data = full[: p.ds_numel].view(p.ds_shape)  # type: ignore[attr-defined]
    p.ds_tensor = None  # type: ignore[attr-defined]


def materialize_partitioned(params: Iterable[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Make parameters built under :class:`Init` whole again, one at a time (every rank, same order)."""
    for p in params:
        if _is_partitioned(p):
            _unpartition_param(p)


class Init:
    """Context manager: modules built inside have their parameters partitioned as they are created.

    Accepts DeepSpeed's arguments; ``data_parallel_group`` picks the group (default: the world),
    ``enabled=False`` makes it a no-op, ``dtype`` casts floating parameters as they are created.
    ``remote_device`` / ``pin_memory`` (parameter offload) and ``mpu`` are not implemented and refused.
    """

    def __init__(
        self,
        module: nn.Module | None = None,
        data_parallel_group: dist.ProcessGroup | None = None,
        mem_efficient_linear: bool = True,
        remote_device: str | None = None,
        pin_memory: bool = False,
        config_dict_or_path: Any = None,
        config: Any = None,
        enabled: bool = True,
        dtype: torch.dtype | None = None,
        mpu: Any = None,
        **_ignored: Any,
    ) -> None:
        if remote_device not in (None, "none", "cuda", "cpu") or (remote_device == "cpu" and pin_memory):
            raise NotImplementedError(
                f"zero.Init(remote_device={remote_device!r}, pin_memory={pin_memory}): parameter offload is not "
                "built yet; partitions stay on the device the module is built on"
            )
        if mpu is not None:
            raise NotImplementedError("zero.Init(mpu=...): model parallelism is not supported by zero.Init")
        self.group = data_parallel_group
        self.enabled = enabled
        self.dtype = dtype
        self._patched: list[tuple[type, Any]] = []
        self._apply = None
        if module is not None and enabled:
            # DeepSpeed's Init(module=m): partition an already built module.
            for p in module.parameters():
                _partition_param(p, self.group)

    def __enter__(self) -> Init:
        if not self.enabled:
            return self
        for cls in _all_module_classes():
            if "__init__" in cls.__dict__:
                original = cls.__dict__["__init__"]
                cls.__init__ = self._wrap_init(original)  # type: ignore[misc]
                self._patched.append((cls, original))
        self._apply = nn.Module.apply
        nn.Module.apply = _gathered_apply(self._apply)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, original in reversed(self._patched):
            cls.__init__ = original  # type: ignore[misc]
        self._patched = []
        if self._apply is not None:
            nn.Module.apply = self._apply  # type: ignore[method-assign]
            self._apply = None

    def _wrap_init(self, original: Any) -> Any:
        init = self

        @functools.wraps(original)
        def wrapped(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            # A subclass's __init__ calls its parents' first: partition when the outermost one returns.
            depth = module.__dict__.get("_zero3_init_depth", 0)
            module.__dict__["_zero3_init_depth"] = depth + 1
            try:
                original(module, *args, **kwargs)
            finally:
                module.__dict__["_zero3_init_depth"] = depth
            if depth > 0:
                return
            del module.__dict__["_zero3_init_depth"]
            for p in module.parameters(recurse=False):
                if init.dtype is not None and p.is_floating_point():
                    p.data = p.data.to(init.dtype)
                _partition_param(p, init.group)

        return wrapped


def _all_module_classes() -> list[type]:
    seen: list[type] = []
    stack = [nn.Module]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen


def _gathered_apply(original: Any) -> Any:
    @functools.wraps(original)
    def apply(self: nn.Module, fn: Any) -> nn.Module:
        def gathered_fn(m: nn.Module) -> None:
            params = [p for p in m.parameters(recurse=False) if _is_partitioned(p)]
            if not params:
                fn(m)
                return
            with GatheredParameters(params, modifier_rank=None, _keep_local_writes=True):
                fn(m)

        return original(self, gathered_fn)

    return apply


@contextlib.contextmanager
def GatheredParameters(
    params: nn.Parameter | Iterable[nn.Parameter],
    modifier_rank: int | None = None,
    fwd_module: nn.Module | None = None,
    enabled: bool = True,
    _keep_local_writes: bool = False,
) -> Iterator[None]:
    """Gather partitioned parameters for the body; with ``modifier_rank``, keep that rank's changes.

    Parameters that are not partitioned (stages 0-2, persistent ones) are left as they are. Every rank
    must enter with the same parameters. ``fwd_module`` is accepted for DeepSpeed compatibility.
    """
    plist = [params] if isinstance(params, torch.Tensor) else list(params or [])
    if not enabled or not plist:
        yield
        return
    units = sorted(
        {id(u): u for p in plist if (u := getattr(p, "_zero3_unit", None)) is not None}.values(), key=lambda u: u.index
    )
    loose = [p for p in plist if _is_partitioned(p)]
    was_gathered = {id(u): u.gathered for u in units}
    for u in units:
        u.wait()
        u.pinned += 1
    for p in loose:
        _unpartition_param(p)
    try:
        yield
    finally:
        for u in units:
            u.pinned -= 1
            if modifier_rank is not None:
                _broadcast_from(u.full, modifier_rank, u.process_group)
                lo, hi = u.layout.partition(u.rank)
                with torch.no_grad():
                    u.swap_in_shard(read=False)  # offload_param nvme: the shard is rewritten whole
                    if u.shard.data_ptr() != u.full[lo:hi].data_ptr():
                        u.shard.copy_(u.full[lo:hi])
                    writer = getattr(u, "master_writer", None)
                    if writer is not None:
                        writer(u.shard.float())  # NVMe offload: the master lives in swap files
                    elif u.master is not None and u.master.data_ptr() != u.shard.data_ptr():
                        u.master.copy_(u.shard.float())
                    u.swap_out_shard()
            if not was_gathered[id(u)]:
                u.release()
        for p in loose:
            if modifier_rank is not None and not _keep_local_writes:
                _broadcast_from(p.data, modifier_rank, getattr(p, "_zero3_group", None))
            p.ds_tensor = None  # type: ignore[attr-defined]
            _partition_param(p, getattr(p, "_zero3_group", None))


def _broadcast_from(t: torch.Tensor, rank: int, group: dist.ProcessGroup | None) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        src = rank if group is None else dist.get_global_rank(group, rank)
        dist.broadcast(t, src=src, group=group)


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Tell stage 3 that ``module``'s forward uses ``parameter`` although another module holds it."""
    external = module.__dict__.setdefault("_zero3_external", [])
    if all(p is not parameter for p in external):
        external.append(parameter)
    unit = getattr(parameter, "_zero3_unit", None)
    coordinator = getattr(unit, "coordinator", None)
    if unit is not None and coordinator is not None:
        coordinator.add_external(module, unit)
