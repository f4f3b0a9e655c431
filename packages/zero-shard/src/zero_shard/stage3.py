"""Stage 3's parameter coordinator: which units to fetch, keep and release, and when.

The layout (:func:`plan_units`): every module that holds trainable parameters directly gets one unit per
param group for the parameters it holds first (a tied parameter belongs to the first module that holds
it, and every module that holds it fetches that unit). Parameters smaller than
``stage3_param_persistence_threshold`` (up to ``stage3_model_persistence_threshold`` elements in all)
are gathered into one persistent unit per group instead, which stays whole.

Fetching (:meth:`ParamCoordinator.fetch`):

1. the request is recorded in the :class:`~zero_shard.prefetch.ExecutionTrace`;
2. a unit that is not gathered or in flight is first *checked*: the ranks all-gather the index of the
   unit each is about to fetch and refuse to go on if they differ, naming every rank's module. This is
   what turns DeepSpeed's classic stage-3 hang (a rank that skips a layer waits forever in the other
   ranks' gather) into an immediate error, and what keeps a gather of two same-sized layers from
   silently mixing them (gloo aborts the process on a collective of mismatched sizes, so the check
   must come before the data);
3. the unit's gather is launched and waited on;
4. prefetch: the next units of the trace (a window of ``stage3_prefetch_bucket_size`` elements, at least
   one unit, while fewer than ``stage3_max_live_parameters`` are live) are launched without waiting, and
   the window after that is *checked ahead*: its agreement check is issued asynchronously and read at
   the next fetch, so in steady state no check makes a rank wait for the others.

[Note: a passed check commits every rank] A look-ahead check that passed is launched by every rank
before any later check is issued (at the next fetch, whatever it asks for), and discarded by every rank
at the end of an iteration. The ranks' collectives therefore stay in the same order even when one of
them deviates right after a check: its next check then differs from the others' and all of them raise.

Releasing: after a module's forward a unit is kept only if the trace says it is requested again within
``stage3_max_reuse_distance`` elements (and the live budget allows), else its full buffer is freed. After
backward a unit is freed as soon as every one of its parameters has received its gradient (autograd's
post-accumulate-grad hook, which fires once all uses of a tied or reused parameter are summed); what is
left at the end of a backward, and everything before an optimizer step, is freed too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zero_shard.comm import ParamCollective, all_gather_single
from zero_shard.flat_buffer import FlatLayout, full_shape
from zero_shard.hooks import in_backward, install_module_hooks
from zero_shard.host_memory import retain_freed_memory
from zero_shard.partition import Unit, UnitGatherError
from zero_shard.prefetch import ExecutionTrace

__all__ = ["ParamCoordinator", "UnitPlan", "plan_units"]

NamedGroup = list[tuple[str, nn.Parameter]]
_CHECK_SLOTS = 8  # units one agreement check covers (and so the most units one prefetch launches)


class UnitPlan:
    """Which parameters form which unit, and which units each module needs (pure; no tensors moved)."""

    def __init__(self) -> None:
        self.units: list[tuple[str, int, bool, NamedGroup]] = []  # (name, group, persistent, params)
        self.needs: dict[nn.Module, list[int]] = {}


def plan_units(
    module: nn.Module,
    groups: list[NamedGroup],
    *,
    persistence_threshold: int,
    model_persistence_threshold: int,
) -> UnitPlan:
    """Lay the managed parameters out in units (see the module docstring)."""
    where = {id(p): (g, n) for g, params in enumerate(groups) for n, p in params}
    persistent: set[int] = set()
    budget = model_persistence_threshold
    for params in groups:
        for _, p in params:
            numel = math.prod(full_shape(p))
            if numel < persistence_threshold and numel <= budget:
                persistent.add(id(p))
                budget -= numel
    plan = UnitPlan()
    unit_of_param: dict[int, int] = {}
    modules = list(module.named_modules(remove_duplicate=True))
    for mod_name, mod in reversed(modules):
        # Reverse order: the last modules' gradients are ready first in backward and their buckets launch first.
        own: dict[int, NamedGroup] = {}
        for _, p in mod.named_parameters(recurse=False):
            if id(p) in where and id(p) not in persistent and id(p) not in unit_of_param:
                g, n = where[id(p)]
                own.setdefault(g, []).append((n, p))
        for g in sorted(own):
            for _, p in own[g]:
                unit_of_param[id(p)] = len(plan.units)
            plan.units.append((mod_name or "<root>", g, False, list(reversed(own[g]))))
    for g, params in enumerate(groups):
        kept = [(n, p) for n, p in params if id(p) in persistent]
        if kept:
            plan.units.append((f"<persistent parameters of group {g}>", g, True, kept))
    for _, mod in modules:
        needed = []
        for p in (*mod.parameters(recurse=False), *getattr(mod, "_zero3_external", ())):
            u = unit_of_param.get(id(p))
            if u is not None and u not in needed:
                needed.append(u)
        if needed:
            plan.needs[mod] = needed
    return plan


@dataclass
class _Check:
    """An agreement check in flight: the units this rank proposes and every rank's proposal (when done)."""

    units: list[Unit]
    mine: torch.Tensor  # the collective's input, kept alive until it completes
    every: torch.Tensor
    work: Any
    module_name: str


class ParamCoordinator:
    """Owns the units of one model and runs the fetch/keep/release policy (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        units: list[Unit],
        needs: dict[nn.Module, list[int]],
        *,
        rank: int,
        world_size: int,
        process_group: dist.ProcessGroup | None,
        prefetch_bucket_size: int,
        max_live_parameters: int,
        max_reuse_distance: int,
        prefetch: bool = True,
    ) -> None:
        self.module = module
        self.units = units
        self.rank = rank
        self.world_size = world_size
        self.group = process_group
        self.prefetch_bucket_size = prefetch_bucket_size
        self.max_live_parameters = max_live_parameters
        self.max_reuse_distance = max_reuse_distance
        self.prefetch_enabled = prefetch and prefetch_bucket_size > 0
        self.trace = ExecutionTrace()
        self.module_names = {m: n or "<root>" for n, m in module.named_modules(remove_duplicate=True)}
        self.units_of = {m: [units[i] for i in idx] for m, idx in needs.items()}
        self.fetches = 0
        self.prefetches = 0
        self.checks = 0
        self.ahead_checks = 0  # checks issued a window ahead (asynchronously)
        self._ahead: _Check | None = None
        self._end_queued = False
        for u in units:
            u.coordinator = self  # type: ignore[attr-defined]
        released = [u for u in units if not u.persistent]
        # On the CPU, stop malloc from unmapping the buffers that every step frees and gathers again.
        self.retains_freed_memory = bool(released) and all(u.device.type == "cpu" for u in released)
        if self.retains_freed_memory:
            # Each step frees the full buffers and, once reduced, the same number of gradient bytes.
            bytes_released = sum(u.numel * u.full.element_size() for u in released)
            self.retains_freed_memory = retain_freed_memory(2 * bytes_released)
        self._handles = install_module_hooks(module, self.units_of, self)
        for u in units:
            if not u.persistent:
                for p in u.params:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready_hook(u)))

    # ---- hook entry points ----------------------------------------------------------------------------

    def start_iteration(self) -> None:
        """The root module's forward begins."""
        if in_backward():
            return
        self.trace.start_iteration()
        self._end_queued = False
        for u in self.units:
            u.pending_grads = sum(1 for p in u.params if p.requires_grad)

    def fetch(self, units: list[Unit], module_name: str, *, backward: bool) -> None:
        """Make ``units`` usable now (a module's forward or backward is about to run), then prefetch."""
        if backward and not self._end_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.release_all)
            self._end_queued = True
        for u in units:
            self.trace.observe(u.index)
            if not u.fetched:
                self._launch_checked_ahead()  # committed first (see the note); it may hold ``u``
            if not u.fetched:
                self._check_same_units([u], module_name)
                u.launch()
                self.fetches += 1
            u.wait()
        if self.prefetch_enabled:
            self._prefetch()

    def after_forward(self, units: list[Unit]) -> None:
        """A module's forward ended: release what will not be needed again soon."""
        if in_backward():
            # An activation-checkpoint recompute inside backward: the module's backward needs them next.
            return
        for u in units:
            if u.persistent or not u.gathered:
                continue
            distance = self.trace.reuse_distance(u.index, self._numel)
            keep = (
                distance is not None
                and distance <= self.max_reuse_distance
                and self.live_elements() <= self.max_live_parameters
            )
            if not keep:
                u.release()

    def release_all(self) -> None:
        """Free every non-persistent unit (end of backward, before a step, ``empty_partition_cache``)."""
        # Every rank reaches this point together: a pending look-ahead is verified, then dropped everywhere.
        self._launch_checked_ahead(launch=False)
        for u in self.units:
            u.release()
        self._end_queued = False

    # ---- bookkeeping -------------------------------------------------------------------------------------

    def live_elements(self) -> int:
        """Elements of non-persistent units gathered or in flight."""
        return sum(u.numel for u in self.units if not u.persistent and u.fetched)

    def add_external(self, module: nn.Module, unit: Unit) -> None:
        """``register_external_parameter`` after the engine was built: ``module``'s forward also needs ``unit``."""
        if module in self.units_of:
            if unit not in self.units_of[module]:
                self.units_of[module].append(unit)
            return
        self.units_of[module] = [unit]
        # Only the module's own pair: its forward must not start a new iteration of the root's trace.
        self._handles += install_module_hooks(None, {module: self.units_of[module]}, self)

    def remove_hooks(self) -> None:
        """Detach from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- internals ----------------------------------------------------------------------------------------

    def _numel(self, index: int) -> int:
        return self.units[index].numel

    def _grad_ready_hook(self, unit: Unit) -> Any:
        def hook(param: nn.Parameter) -> None:
            unit.pending_grads -= 1
            if unit.pending_grads <= 0:
                unit.release()

        return hook

    def _take(self, candidates: list[Unit], live: int) -> tuple[list[Unit], int]:
        """The leading candidates not yet gathered or in flight that fit the live budget (one check's worth)."""
        todo: list[Unit] = []
        for u in candidates:
            if u.fetched or u in todo:
                continue
            if live + u.numel > self.max_live_parameters or len(todo) == _CHECK_SLOTS:
                break
            todo.append(u)
            live += u.numel
        return todo, live

    def _prefetch(self) -> None:
        self._launch_checked_ahead()
        window = self.trace.upcoming(self._numel, self.prefetch_bucket_size)
        if not window:
            return
        current = [self.units[i] for i in window]
        following = [
            self.units[i] for i in self.trace.upcoming(self._numel, self.prefetch_bucket_size, skip=len(window))
        ]
        live = self.live_elements()
        nxt = current[0]
        if not nxt.fetched:
            # Behind (an iteration's first window, or after a deviation): check this window now and launch it.
            now, live = self._take(current, live)
            if now:
                self._check_same_units(now, now[0].name)
                for u in now:
                    u.launch()
                self.prefetches += len(now)
        # Check what comes next ahead of time, without waiting: it is launched at the next fetch.
        ahead, _ = self._take(current + following, live)
        if ahead:
            self._ahead = self._start_check(ahead, ahead[0].name)
            self.ahead_checks += 1

    def _launch_checked_ahead(self, launch: bool = True) -> None:
        """Verify the pending look-ahead check and launch (or, at an iteration's end, drop) its units."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        self._finish_check(ahead)
        if not launch:
            return
        live = self.live_elements()
        for u in ahead.units:
            # The same state on every rank, so the same units are launched (or left for later) everywhere.
            if u.fetched or live + u.numel > self.max_live_parameters:
                continue
            u.launch()
            live += u.numel
            self.prefetches += 1

    def _check_same_units(self, units: list[Unit], module_name: str) -> None:
        """Refuse to gather when the ranks are about to gather different units (a rank skipped a module)."""
        self._finish_check(self._start_check(units, module_name))

    def _start_check(self, units: list[Unit], module_name: str) -> _Check | None:
        """Issue the agreement check for ``units`` (asynchronously); None on a single rank.

        A fixed-size vector (count, then the unit indices), so that ranks that disagree on how many units
        they gather still run a collective of the same size and learn of it.
        """
        if self.world_size == 1:
            return None
        self.checks += 1
        device = units[0].device
        mine = torch.full((_CHECK_SLOTS + 1,), -1, dtype=torch.int64)
        mine[0] = len(units)
        mine[1 : len(units) + 1] = torch.tensor([u.index for u in units], dtype=torch.int64)
        mine = mine.to(device)
        every = torch.empty(self.world_size * (_CHECK_SLOTS + 1), dtype=torch.int64, device=device)
        try:
            work = all_gather_single(every, mine, self.group, async_op=True)
        except Exception as e:
            raise self._check_failed(units, module_name, e) from e
        return _Check(units, mine, every, work, module_name)

    def _finish_check(self, check: _Check | None) -> None:
        if check is None:
            return
        try:
            if check.work is not None:
                check.work.wait()
        except Exception as e:
            raise self._check_failed(check.units, check.module_name, e) from e
        rows = check.every.view(self.world_size, _CHECK_SLOTS + 1).tolist()
        if any(row != rows[self.rank] for row in rows):
            names = ", ".join(
                f"rank {r}: {' + '.join(self._unit_name(i) for i in row[1 : row[0] + 1])}" for r, row in enumerate(rows)
            )
            raise UnitGatherError(
                f"rank {self.rank}: ZeRO-3 ranks requested different modules' parameters ({names}). Every rank "
                f"must run the same modules in the same order under stage 3 (a layer skipped or a branch taken "
                f"on some ranks only?); make the control flow agree across ranks, or register the parameters "
                f"of a conditionally used module as persistent (stage3_param_persistence_threshold)."
            )

    def _check_failed(self, units: list[Unit], module_name: str, error: Exception) -> UnitGatherError:
        return UnitGatherError(
            f"rank {self.rank}: ZeRO-3 could not agree with the other ranks before gathering the parameters "
            f"of {module_name} (unit {units[0].name}): {error}"
        )

    def _unit_name(self, index: int) -> str:
        return self.units[index].name if 0 <= index < len(self.units) else f"<unit {index}>"


def build_units(
    plan: UnitPlan,
    *,
    rank: int,
    world_size: int,
    dtype: torch.dtype,
    device: torch.device,
    process_group: dist.ProcessGroup | None,
    method: ParamCollective,
) -> list[Unit]:
    """The :class:`Unit` objects of a plan, with the layouts sized for ``world_size`` (values bound later)."""
    return [
        Unit(
            index=i,
            name=name,
            layout=FlatLayout(params, world_size),
            group=g,
            persistent=persistent,
            rank=rank,
            world_size=world_size,
            dtype=dtype,
            device=device,
            process_group=process_group,
            method=method,
        )
        for i, (name, g, persistent, params) in enumerate(plan.units)
    ]
