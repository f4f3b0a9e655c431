"""ZeroShardedOptimizer: ZeRO stages 0, 1 and 2 over any torch optimizer, with fp32 master partitions.

Per parameter group (see :mod:`zero_shard.flat_buffer`):

- the model's parameters become views into one flat buffer of the compute dtype (fp32, bf16 or fp16),
  padded to a multiple of the data-parallel world size N;
- the fp32 master copy is the whole buffer at stage 0 and this rank's 1/N partition at stages 1-2; it is
  the one parameter the inner optimizer sees for the group, so the optimizer state is 1/N too. For an
  fp32 model the master is not a copy but the flat buffer itself (its partition), saving 4 bytes/param;
- gradients are reduced in fp32 (upcast as they are produced, which also makes accumulation over
  micro-steps fp32 at stages 0-1) by :class:`~zero_shard.grad_reduce.GradReducer`: stages 0-1 hold a
  full fp32 accumulator, stage 2 only this rank's partition, kept in ``grad_accum_dtype`` (DeepSpeed's
  ``data_types.grad_accum_dtype``; default the model's dtype, as DeepSpeed does, so that a bf16/fp16
  model holds 2Φ + 14Φ/N bytes of model state as in the ZeRO paper). A 16-bit partition is upcast to
  fp32 for the step only (a transient of 4 bytes per partition element, as DeepSpeed's stage 2 does).

A step: unscale + global-norm + overflow check + clip (``amp_scaler.unscale_and_clip_``, the norm summed
over ranks at stages 1-2), the inner optimizer on the fp32 partition, the partition cast back into the
flat compute-dtype buffer, and an all-gather of the partitions (:func:`~zero_shard.comm.gather_partitions`).

[Note: reduce in fp32] With bf16/fp16 parameters we upcast gradients before reducing rather than reducing
in 16 bits: sums of N 16-bit gradients lose bits (bf16 has 8), and fp32 is what the master update needs
anyway. It doubles the bytes on the wire relative to a 16-bit reduction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from amp_scaler import StaticLossScaler, clip_factor, global_grad_norm, unscale_and_clip_
from zero_shard.comm import CollectiveChoice, choose_collectives, gather_partitions
from zero_shard.config import ZeroConfig
from zero_shard.flat_buffer import FlatLayout
from zero_shard.grad_reduce import GradReducer
from zero_shard.torch_optimizer import TorchOptimizerFacade

if TYPE_CHECKING:
    from offload_io import AioConfig
    from zero_shard.offload import OptimizerOffload
    from zero_shard.stage3 import ParamCoordinator

__all__ = ["ZeroShardedOptimizer", "default_optimizer_factory"]

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def default_optimizer_factory(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> OptimizerFactory:
    """An AdamW factory: ds-native's CPU Adam for CPU partitions when it is installed, else ``torch.optim.AdamW``.

    ``weight_decay`` defaults to 0 as DeepSpeed's ``"Adam"`` does (decoupled, AdamW-style, when set).
    """

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
        try:
            from ds_native.optim import CPUAdam  # type: ignore[import-not-found]
        except ImportError:
            CPUAdam = None
        if CPUAdam is not None and on_cpu:
            return CPUAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    return make


def _normalize_groups(named_params: Any) -> list[tuple[list[tuple[str, nn.Parameter]], dict[str, Any]]]:
    """``[(named trainable params, hyperparameters)]`` from a named-param list or a list of group dicts."""
    items = list(named_params)
    if items and isinstance(items[0], dict):
        raw = [(list(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in items]
    else:
        raw = [(items, {})]
    seen: set[int] = set()
    out = []
    for gi, (params, hyper) in enumerate(raw):
        kept = []
        for entry in params:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor)):
                raise TypeError(
                    f"ZeroShardedOptimizer: param group {gi} must hold (name, parameter) pairs, got {type(entry).__name__}"
                )
            name, p = entry
            # Tied weights appear once; frozen parameters are not optimized.
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            kept.append((name, p))
        if kept:
            out.append((kept, hyper))
    if not out:
        raise ValueError("ZeroShardedOptimizer: no trainable parameters (requires_grad=True) were given")
    return out


class ZeroShardedOptimizer(TorchOptimizerFacade):
    """ZeRO stage 0/1/2 optimizer wrapper (see the module docstring for the layout).

    A ``torch.optim.Optimizer``: ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's
    own objects, so torch's LR schedulers work on it; ``state_dict()`` is this rank's state
    (see :mod:`zero_shard.torch_optimizer`).

    Args:
        named_params: ``[(name, param), ...]`` or param groups ``[{"params": [(name, param), ...], **hyper}]``.
            Names key the checkpoint state; they must be unique.
        optimizer_factory: builds the inner optimizer from ``[{"params": [fp32 partition], **hyper}]``
            (see :func:`default_optimizer_factory`). Any element-wise torch optimizer works exactly;
            one that mixes elements of a tensor (LAMB's per-tensor trust ratio, Adafactor) would see a
            whole flat partition as one tensor.
        config: the ``zero_optimization`` section (stage 0, 1 or 2).
        process_group: the data-parallel group (None: the default group, or a single process when
            torch.distributed is not initialized).
        compute_dtype: the model parameters' dtype during forward/backward; the parameters are cast to it.
        loss_scaler: an ``amp_scaler`` loss scaler (fp16); None: a static scale of 1.
        gradient_clipping: clip the global gradient norm to this value (0: off).
        gradient_predivide_factor: DeepSpeed's pre-division before the sum (1.0: none).
        collectives: force the gradient/parameter collectives (None: chosen for the backend).
        grad_accum_dtype: dtype of the stage-2 gradient partition: ``torch.float32`` or ``compute_dtype``
            (None, the default: ``compute_dtype``, DeepSpeed's default). fp32 makes a 16-bit stage 2
            accumulate exactly and give the same numbers as stages 0-1, for 2Φ/N more bytes.
        model_parallel_group: with pipeline / tensor parallelism, the ranks holding the other parts of
            this replica (DeepSpeed's ``mpu.get_model_parallel_group()``, pipe x tensor): the gradient
            norm (clipping) and the fp16 overflow decision are then taken over the whole model, not
            just this rank's part. None: no model parallelism.
        replicated_params: parameters whose gradient another rank of ``model_parallel_group`` holds
            identically and counts (tensor-parallel replicated biases/norms on tensor rank > 0, tied
            weights on a pipeline stage other than the first that uses them): left out of the norm so
            that each element counts once, still unscaled, clipped and checked for inf/nan.

        aio_config: the ``aio`` section (offload-io's ``AioConfig``) for NVMe offload's file IO (None: defaults).

    With ``config.offload_optimizer.device`` ``cpu`` or ``nvme`` the master partitions and optimizer state
    live in host memory or NVMe swap files and the step runs on the CPU (:mod:`zero_shard.offload`).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]] | Iterable[dict[str, Any]],
        optimizer_factory: OptimizerFactory,
        config: ZeroConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        compute_dtype: torch.dtype = torch.float32,
        loss_scaler: Any = None,
        gradient_clipping: float = 0.0,
        gradient_predivide_factor: float = 1.0,
        collectives: CollectiveChoice | None = None,
        grad_accum_dtype: torch.dtype | None = None,
        module: nn.Module | None = None,
        model_parallel_group: dist.ProcessGroup | None = None,
        replicated_params: Iterable[torch.Tensor] = (),
        aio_config: AioConfig | None = None,
    ) -> None:
        config = config if config is not None else ZeroConfig()
        if int(config.stage) == 3 and module is None:
            raise ValueError("ZeroShardedOptimizer: stage 3 needs module= (the model whose parameters it partitions)")
        groups = _normalize_groups(named_params)
        device = groups[0][0][0][1].device
        missing = config.unsupported_features(model_on_cpu=device.type == "cpu")
        if missing:
            raise NotImplementedError(
                "zero-shard does not implement these configured features yet: " + "; ".join(missing)
            )
        if compute_dtype not in (torch.float32, *_LOW_PRECISION):
            raise ValueError(
                f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {compute_dtype}"
            )
        if gradient_clipping < 0 or not math.isfinite(gradient_clipping):
            raise ValueError(f"gradient_clipping must be a finite number >= 0, got {gradient_clipping!r}")
        grad_accum_dtype = compute_dtype if grad_accum_dtype is None else grad_accum_dtype
        if grad_accum_dtype not in (torch.float32, compute_dtype):
            raise ValueError(
                f"grad_accum_dtype must be torch.float32 or the compute dtype ({compute_dtype}), got {grad_accum_dtype}"
            )
        if not gradient_predivide_factor > 0:
            raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor!r}")
        names = [n for params, _ in groups for n, _ in params]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"ZeroShardedOptimizer: parameter names must be unique, repeated: {dup[:5]}")

        distributed = dist.is_available() and dist.is_initialized()
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        backend = str(dist.get_backend(process_group)).lower() if distributed else "none"
        self.config = config
        self.stage = int(config.stage)
        self.compute_dtype = compute_dtype
        self.gradient_clipping = float(gradient_clipping)
        self.loss_scaler = loss_scaler if loss_scaler is not None else StaticLossScaler(1.0, process_group)
        self.collectives = collectives or choose_collectives(
            backend,
            min(self.stage, 2),
            reduce_scatter=config.reduce_scatter,
            allgather_partitions=config.allgather_partitions,
        )
        if self.stage == 0 and self.collectives.grad != "all_reduce":
            raise ValueError("stage 0 needs the whole reduced gradient on every rank: grad collective 'all_reduce'")

        self.coordinator: ParamCoordinator | None = None
        self.offload: OptimizerOffload | None = None
        off = config.offload_optimizer
        if off is not None and off.enabled:
            from zero_shard.offload import OptimizerOffload

            self.offload = OptimizerOffload(self, off, aio_config, device)
        if self.stage == 3:
            self._build_stage3(groups, module, device, process_group)
        else:
            self._build_flat(groups, device)
        masters_of = [
            [m for m, g in zip(self.masters, self.layout_group, strict=True) if g == gi] for gi in range(len(groups))
        ]
        self.inner = optimizer_factory(
            [{"params": ms, **hyper} for ms, (_, hyper) in zip(masters_of, groups, strict=True)]
        )
        if len(self.inner.param_groups) != len(groups):
            raise ValueError("optimizer_factory must keep one param group per group it is given")
        if self.offload is not None:
            self.offload.check_inner(self.inner)
        # [Note: self-communicating optimizers] An inner optimizer with ``communicates_gradients``
        # (onebit-comm's 1-bit Adam / 0/1 Adam / 1-bit LAMB) averages what it needs itself. Before each
        # boundary backward we ask it whether its next step wants full-precision averaged gradients
        # (warm-up): then the reducer all-reduces as usual, so clipping and overflow checks see the
        # averaged gradient; otherwise every rank keeps its local gradient (clipped by its local norm,
        # the overflow decision still agreed over ranks). It communicates the full optimizer state,
        # which stages 1-2 partition: stage 0 only.
        self.self_communicating = bool(getattr(self.inner, "communicates_gradients", False))
        if self.self_communicating:
            if self.stage != 0:
                raise NotImplementedError(
                    f"{type(self.inner).__name__} communicates its own compressed momentum and needs the whole "
                    f"optimizer state on every rank: it runs with zero_optimization.stage 0 only (got stage "
                    f"{self.stage}); use stage 0, or a plain optimizer (Adam, AdamW) with stages 1-3"
                )
            self.inner.bind_flat_layout([[(s.offset, s.numel) for s in lay.slots] for lay in self.layouts])

        self.reducer = GradReducer(
            self.layouts,
            # Stage 3 reduces gradients exactly as stage 2 does, into per-unit partitions.
            stage=min(self.stage, 2),
            rank=self.rank,
            world_size=self.world_size,
            process_group=process_group,
            bucket_numel=config.reduce_bucket_elements,
            overlap_comm=bool(config.overlap_comm),
            collective=self.collectives.grad,
            predivide_factor=float(gradient_predivide_factor),
            ignore_unused_parameters=config.ignore_unused_parameters,
            device=device,
            partition_dtype=grad_accum_dtype,
            cross_layout_buckets=self.stage == 3,
        )
        self.model_parallel_group = model_parallel_group
        self._norm_split = self._replicated_ranges({id(p) for p in replicated_params})
        self._boundary = True
        self.last_step_sub_groups = 1  # how many pieces the last step went in (stage 3 sub_group_size)
        self._partition_numel = sum(m.numel() for m in self.masters)  # fixed: the layouts never change
        self._global_grad_norm: float | None = None
        self.global_steps = 0
        self._init_torch_optimizer()

    # ---- the training-loop API --------------------------------------------------------------------

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Tell the optimizer whether the next backward is the last micro-step before :meth:`step`."""
        self._boundary = bool(is_boundary)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Back-propagate ``loss`` times the loss scale; reduces gradients as configured for the stage."""
        communicate = True
        if self.self_communicating and self._boundary:
            communicate = bool(self.inner.needs_averaged_gradients())
        self.reducer.begin_backward(self._boundary, communicate=communicate)
        self.loss_scaler.scale_loss(loss).backward(retain_graph=retain_graph)

    def step(self, closure: Callable[[], Any] | None = None) -> bool:
        """Unscale/clip, step the fp32 partition, refresh the model. False when skipped for overflow."""
        if closure is not None:
            raise ValueError("ZeroShardedOptimizer.step does not take a closure")
        if self.coordinator is not None:
            self.coordinator.release_all()
        if self.offload is not None:
            return self.offload.step()
        if self.coordinator is not None and self._partition_numel > self.config.sub_group_size:
            return self._step_in_sub_groups()
        # A 16-bit stage-2 partition is upcast for the step only: unscaling fp16 gradients in fp16 would
        # flush the small ones to zero, and the inner optimizer wants fp32 gradients for fp32 masters.
        grads = [self.reducer.grads_for_step(g).float() for g in range(len(self.masters))]
        counted, replicated = self._split_for_norm(grads)
        norm, found_inf = unscale_and_clip_(
            counted,
            self.loss_scaler.inv_scale,
            self.gradient_clipping,
            process_group=self.process_group,
            sharded=self.stage != 0,
            model_parallel_group=self.model_parallel_group,
            replicated=replicated,
        )
        self._global_grad_norm = norm
        self.loss_scaler.update_scale(found_inf)
        if found_inf:
            self.reducer.zero_grad()
            return False
        for master, grad in zip(self.masters, grads, strict=True):
            master.grad = grad
        self.inner.step()
        for master in self.masters:
            master.grad = None
        self._refresh_model()
        self.reducer.zero_grad()
        self.global_steps += 1
        return True

    def _step_in_sub_groups(self) -> bool:
        """Stage 3 with ``sub_group_size``: step the partitions a sub-group at a time.

        The global norm is taken from the gradients as they are (16-bit ones accumulate in fp32), then each
        sub-group of about ``sub_group_size`` elements is upcast, unscaled/clipped and stepped on its own, so
        the fp32 working set of the step is one sub-group rather than the whole partition (DeepSpeed's
        ``sub_group_size``; what NVMe offload swaps at a time).
        """
        raw = [self.reducer.grads_for_step(i) for i in range(len(self.masters))]
        inv = self.loss_scaler.inv_scale
        counted, replicated = self._split_for_norm(raw)
        total = (
            global_grad_norm(
                counted,
                self.process_group,
                sharded=True,
                model_parallel_group=self.model_parallel_group,
                replicated=replicated,
            )
            * inv
        )
        found_inf = not math.isfinite(total)
        self._global_grad_norm = total
        self.loss_scaler.update_scale(found_inf)
        if found_inf:
            self.reducer.zero_grad()
            return False
        factor = clip_factor(total, self.gradient_clipping, inv)
        limit = max(1, int(self.config.sub_group_size))
        start = 0
        self.last_step_sub_groups = 0
        while start < len(self.masters):
            self.last_step_sub_groups += 1
            stop, numel = start, 0
            while stop < len(self.masters) and (stop == start or numel + self.masters[stop].numel() <= limit):
                numel += self.masters[stop].numel()
                stop += 1
            for i in range(start, stop):
                grad = raw[i].float()  # fp32 already: in place (the partition is zeroed after the step anyway)
                if factor != 1.0:
                    grad.mul_(factor)
                self.masters[i].grad = grad
            self.inner.step()
            for i in range(start, stop):
                self.masters[i].grad = None
            start = stop
        self._refresh_model()
        self.reducer.zero_grad()
        self.global_steps += 1
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear accumulated gradients (the model's ``.grad`` are kept at None by the hooks)."""
        self.reducer.zero_grad()
        for lay in self.layouts:
            for p in lay.params:
                p.grad = None

    # ---- properties the engine reads ---------------------------------------------------------------

    @property
    def global_grad_norm(self) -> float | None:
        """The global (unscaled, pre-clip) gradient norm of the last step, None before the first."""
        return self._global_grad_norm

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 without fp16)."""
        return self.loss_scaler.loss_scale

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because gradients overflowed."""
        return self.loss_scaler.skipped_steps

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds per kind: ``master`` (0 for an fp32 model: the master is the parameters'
        own memory), ``optimizer_state``, ``gradients`` (reduced or accumulating) and ``params``."""
        state = sum(
            t.numel() * t.element_size()
            for s in self.inner.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
        grads = sum(
            t.numel() * t.element_size() for t in (*self.reducer.part_grads, *self.reducer.accum) if t is not None
        )
        # NVMe offload: master and moments are in swap files (the masters are empty placeholders here).
        swapped = {"swapped": self.offload.swapped_bytes()} if self.offload is not None else {}
        if self.stage == 3:
            # Parameters: the full buffers allocated right now (persistent units, any unit still gathered)
            # plus every shard that is its own memory (an fp32 persistent unit's shard is a view of its buffer).
            # For fp32 the shard is also the master: counted once, here.
            full = sum(u.resident_bytes() for u in self.units)
            own_shards = [
                u.shard
                for u in self.units
                if u.shard.untyped_storage().data_ptr() != u.full.untyped_storage().data_ptr()
            ]
            shard_ptrs = {t.untyped_storage().data_ptr() for t in (*own_shards, *(u.full for u in self.units))}
            masters = [m for m in self.masters if m.untyped_storage().data_ptr() not in shard_ptrs]
            return {
                "master": sum(m.numel() * m.element_size() for m in masters),
                "optimizer_state": state,
                "gradients": grads,
                "params": full + sum(t.numel() * t.element_size() for t in own_shards),
            } | swapped
        # An fp32 model's master shares the parameters' memory: count it only where it is a copy.
        own = [
            m
            for m, f in zip(self.masters, self.flat_params, strict=True)
            if m.untyped_storage().data_ptr() != f.untyped_storage().data_ptr()
        ]
        return {
            "master": sum(m.numel() * m.element_size() for m in own),
            "optimizer_state": state,
            "gradients": grads,
            "params": sum(f.numel() * f.element_size() for f in self.flat_params),
        } | swapped

    def empty_partition_cache(self) -> None:
        """Stage 3: free every gathered, non-persistent unit now (DeepSpeed's name). No-op below stage 3."""
        if self.coordinator is not None:
            self.coordinator.release_all()

    def managed_param_ids(self) -> set[int]:
        """``id()`` of every model parameter this optimizer holds an fp32 master for."""
        return {id(p) for lay in self.layouts for p in lay.params}

    # ---- checkpoint state (implemented in checkpoint_state.py) ----------------------------------------

    def sharded_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's fp32 master and optimizer-state fragments by parameter name, plus JSON-able metadata."""
        from zero_shard.checkpoint_state import sharded_state

        return sharded_state(self)

    def load_sharded_state(self, shards: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> None:
        """Load from every saved rank's :meth:`sharded_state` (any world size, any stage 0/1/2)."""
        from zero_shard.checkpoint_state import load_sharded_state

        load_sharded_state(self, shards)

    # ---- internals ----------------------------------------------------------------------------------

    def _replicated_ranges(self, replicated: set[int]) -> list[list[tuple[int, int]]]:
        """Per group, the ``[a, b)`` ranges of :meth:`GradReducer.grads_for_step`'s tensor that hold
        replicated parameters' gradients (see ``replicated_params``); empty lists when there are none."""
        out: list[list[tuple[int, int]]] = []
        for lay in self.layouts:
            lo, hi = (0, lay.padded_numel) if self.stage == 0 else lay.partition(self.rank)
            ranges = []
            for p, slot in zip(lay.params, lay.slots, strict=True):
                a, b = max(lo, slot.offset), min(hi, slot.end)
                if id(p) in replicated and a < b:
                    ranges.append((a - lo, b - lo))
            out.append(ranges)
        return out

    def _split_for_norm(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(counted, replicated)`` views that together cover ``grads``: what the norm counts and what it skips."""
        if not any(self._norm_split):
            return grads, []
        counted: list[torch.Tensor] = []
        replicated: list[torch.Tensor] = []
        for grad, ranges in zip(grads, self._norm_split, strict=True):
            start = 0
            for a, b in ranges:
                if start < a:
                    counted.append(grad[start:a])
                replicated.append(grad[a:b])
                start = b
            if start < grad.numel():
                counted.append(grad[start:])
        return counted, replicated

    def _build_flat(self, groups: list[Any], device: torch.device) -> None:
        """Stages 0-2: one flat layout per param group; the model's parameters become views into it."""
        self.layouts = [FlatLayout(params, self.world_size) for params, _ in groups]
        self.layout_group = list(range(len(groups)))
        # fp32 master: from the parameters' values before any cast to the compute dtype.
        self.masters: list[nn.Parameter] = []
        self.flat_params: list[torch.Tensor] = []
        off = self.offload if self.offload is not None and self.offload.relocates_master else None
        if off is not None:
            off.plan([lay.partition_numel for lay in self.layouts])
        for li, lay in enumerate(self.layouts):
            lo, hi = lay.partition(self.rank)
            if off is not None and off.nvme_enabled:
                # NVMe: the master goes to swap files piece by piece, never whole in memory.
                flat = lay.flatten(self.compute_dtype, device)
                master = off.make_master(li, None, lay)
                self.masters.append(nn.Parameter(master, requires_grad=False))
                self.flat_params.append(flat)
                lay.bind_params(flat)
                continue
            full = lay.flatten(torch.float32, device)
            if off is not None:
                # Host master (CPU offload of an accelerator model): its own memory, never the model's.
                flat = full.to(self.compute_dtype)
                master = off.make_master(li, full[lo:hi])
            elif self.compute_dtype in _LOW_PRECISION:
                flat = full.to(self.compute_dtype)
                master = full if self.stage == 0 else full[lo:hi].clone()
            else:
                # fp32 model: the master IS the model's flat buffer (its partition at stages 1-2), no copy.
                flat = full
                master = full if self.stage == 0 else full[lo:hi]
            self.masters.append(nn.Parameter(master, requires_grad=False))
            self.flat_params.append(flat)
            lay.bind_params(flat)

    def _build_stage3(
        self, groups: list[Any], module: nn.Module, device: torch.device, process_group: dist.ProcessGroup | None
    ) -> None:
        """Stage 3: per-module units (:mod:`zero_shard.stage3`), each partitioned, released until used."""
        from zero_shard.init import materialize_partitioned
        from zero_shard.stage3 import ParamCoordinator, build_units, plan_units

        cfg = self.config.resolve_auto()
        plan = plan_units(
            module,
            [params for params, _ in groups],
            persistence_threshold=int(cfg.param_persistence_threshold),
            model_persistence_threshold=int(cfg.model_persistence_threshold),
        )
        units = build_units(
            plan,
            rank=self.rank,
            world_size=self.world_size,
            dtype=self.compute_dtype,
            device=device,
            process_group=process_group,
            method=self.collectives.param,
        )
        self.units = units
        self.layouts = [u.layout for u in units]
        self.layout_group = [u.group for u in units]
        self.masters = []
        self.flat_params = []
        par = self.config.offload_param
        # Offloaded parameter shards need a master of their own (an fp32 shard may otherwise be the master).
        param_off = par is not None and par.enabled and (par.device.value == "nvme" or device.type != "cpu")
        off = self.offload if self.offload is not None and (self.offload.relocates_master or param_off) else None
        if off is not None:
            off.plan([u.layout.partition_numel for u in units])
        for li, u in enumerate(units):
            # Parameters built under zero.Init hold only their partition: gather them one at a time.
            materialize_partitioned(u.params, process_group)
            full = u.layout.flatten(torch.float32, device)
            lo, hi = u.layout.partition(self.rank)
            if off is not None:
                # Offloaded master (host memory or swap files): never shared with the unit's shard.
                master = off.make_master(li, full[lo:hi])
                u.bind(full)
                if off.nvme_enabled:
                    u.master_writer = off.master_writer(li)  # type: ignore[attr-defined]
            elif self.compute_dtype in _LOW_PRECISION:
                master = full[lo:hi].clone()
                u.bind(full)
            elif u.persistent:
                u.bind(full)
                master = u.full[lo:hi]  # fp32 and always resident: the master is the buffer's partition
            else:
                master = full[lo:hi].clone()
                u.bind(full, shard=master)
            del full
            u.release()
            u.master = master
            self.masters.append(nn.Parameter(master, requires_grad=False))
            self.flat_params.append(u.full)
        self.param_store = None
        if param_off:
            self._offload_params(units, par)
        self.coordinator = ParamCoordinator(
            module,
            units,
            plan.needs,
            rank=self.rank,
            world_size=self.world_size,
            process_group=process_group,
            prefetch_bucket_size=int(cfg.prefetch_bucket_size),
            max_live_parameters=int(cfg.max_live_parameters),
            max_reuse_distance=int(cfg.max_reuse_distance),
        )

    def _resident(self, li: int, write: bool = False) -> Any:
        """Context: master ``li`` and its optimizer state in memory (a no-op unless they are on NVMe)."""
        if self.offload is None:
            return contextlib.nullcontext()
        return self.offload.resident(li, write)

    def _offload_target(self, li: int) -> torch.Tensor:
        """Where master ``li``'s updated values go in the model: its flat partition (stage 3: the unit's shard)."""
        if self.stage == 3:
            return self.units[li].shard
        lo, hi = self.layouts[li].partition(self.rank)
        return self.flat_params[li][lo:hi]

    def _offload_params(self, units: list[Any], par: Any) -> None:
        """``offload_param``: shards to host memory (cpu) or swap files (nvme), persistent units excepted."""
        from offload_io.cpu_state import host_empty

        if par.device.value == "nvme":
            from offload_io.param_state import SwappedParams

            aio = self.offload.aio if self.offload is not None else None
            self.param_store = SwappedParams(par, aio=aio, dtype=self.compute_dtype, tag=f"param-rank{self.rank}")
        for u in units:
            if u.persistent:
                continue
            n = u.shard.numel()
            if self.param_store is not None and not self.param_store.keep_in_cpu(n):
                u.attach_store(self.param_store, f"unit{u.index}")
            elif u.shard.device.type != "cpu":
                u.place_shard(host_empty(n, self.compute_dtype, pin=par.pin_memory))

    def _refresh_model(self, copy_master: bool = True) -> None:
        """Copy the fp32 master into the compute-dtype flat buffers and share the partitions.

        ``copy_master=False``: the partitions already hold the new values (the offloaded step wrote them).
        """
        if self.stage == 3:
            with torch.no_grad():
                for li, (u, master) in enumerate(zip(self.units, self.masters, strict=True)):
                    if copy_master:
                        with self._resident(li):
                            u.swap_in_shard(read=False)
                            if u.shard.data_ptr() != master.data_ptr():
                                u.shard.copy_(master)
                            u.swap_out_shard()
                    u.refresh(self.config.allgather_bucket_size)
            return
        with torch.no_grad():
            for li, (lay, master, flat) in enumerate(zip(self.layouts, self.masters, self.flat_params, strict=True)):
                lo, hi = (0, lay.padded_numel) if self.stage == 0 else lay.partition(self.rank)
                if copy_master:
                    with self._resident(li):
                        if flat[lo:hi].data_ptr() != master.data_ptr():
                            flat[lo:hi].copy_(master)
                if self.stage == 0:
                    continue
                gather_partitions(
                    flat,
                    lay.partition_numel,
                    self.rank,
                    self.world_size,
                    method=self.collectives.param,
                    bucket_numel=self.config.allgather_bucket_size,
                    group=self.process_group,
                )

    def __repr__(self) -> str:
        n = sum(lay.numel for lay in self.layouts)
        return (
            f"ZeroShardedOptimizer(stage={self.stage}, world_size={self.world_size}, params={n}, "
            f"compute_dtype={self.compute_dtype}, collectives={self.collectives})"
        )
