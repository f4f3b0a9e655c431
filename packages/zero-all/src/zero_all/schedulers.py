"""DeepSpeed's learning-rate schedules, with DeepSpeed's formulas and parameter names.

WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle and LRRangeTest (from
deepspeed/runtime/lr_schedules.py); as in DeepSpeed a ds_config may also name a
``torch.optim.lr_scheduler`` class (``"StepLR"``, ``"CosineAnnealingLR"``...), see ``build_scheduler``. Each works on anything with ``param_groups`` (a torch
optimizer or zero-shard's ZeroShardedOptimizer), sets ``group["lr"]`` on ``step()``, and has a
JSON-able ``state_dict()`` so checkpoints stay pickle-free.

As in DeepSpeed, ``last_batch_iteration`` counts optimizer steps; the constructor already
applies the learning rate for step 0 (except LRRangeTest/OneCycle, which start from their minimum).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

__all__ = [
    "SCHEDULERS",
    "LRRangeTest",
    "OneCycle",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
    "build_scheduler",
    "scheduler_class",
    "scheduler_param_names",
    "torch_scheduler_names",
]

WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"


def _update_lr(param_groups: list[dict[str, Any]], lrs: list[Any]) -> list[Any]:
    """Set each group's lr; a tensor lr is updated in place (``fill_``), as torch's and DeepSpeed's schedulers do.

    (A tensor lr is how torch's fused/capturable optimizers avoid recompiling when the lr changes; replacing
    it with a float would undo that.) Returns the new lrs, tensors cloned so they do not alias the groups.
    """
    for group, lr in zip(param_groups, lrs, strict=False):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr.squeeze() if isinstance(lr, torch.Tensor) else lr)
        else:
            group["lr"] = lr
    return [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in param_groups]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"scheduler.params.{name} must be a positive integer, got {value!r}")
    return value


def _per_group(optimizer: Any, value: Any, name: str) -> list[Any]:
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"scheduler.params.{name}: expected {n} values (one per param group), got {len(value)}")
        return list(value)
    return [value] * n


def _check_warmup(warmup_num_steps: Any, warmup_type: str) -> None:
    """Validate the warmup parameters WarmupLR and WarmupCosineLR share."""
    # 0 is allowed, as in DeepSpeed (the HF Trainer writes it when there is no warm-up): the schedules use
    # max(2, warmup_num_steps), so the lr reaches warmup_max_lr after 2 steps.
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) or warmup_num_steps < 0:
        raise ValueError(f"scheduler.params.warmup_num_steps must be a non-negative integer, got {warmup_num_steps!r}")
    if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        raise ValueError(f"scheduler.params.warmup_type must be 'log' or 'linear', got {warmup_type!r}")


class _Schedule:
    """Shared step/state logic: subclasses implement ``get_lr()`` from ``last_batch_iteration``."""

    optimizer: Any
    last_batch_iteration: int
    _last_lr: list[float]

    def get_lr(self) -> list[float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one optimizer step (or jump to ``last_batch_iteration``) and set the lr of every group."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _update_lr(self.optimizer.param_groups, self.get_lr())

    def get_last_lr(self) -> list[float]:
        """The learning rates set by the last ``step()`` (or the constructor)."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the step counter (the parameters come from the config)."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the step counter and re-apply that step's learning rate to the optimizer."""
        self.last_batch_iteration = int(sd["last_batch_iteration"])
        self._last_lr = _update_lr(self.optimizer.param_groups, self.get_lr())


class WarmupLR(_Schedule):
    """Raise the lr from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` (log or linear), then hold.

    ``warmup_max_lr`` unset (None, DeepSpeed's default): each param group's own lr at construction.
    """

    def __init__(
        self,
        optimizer: Any,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        _check_warmup(warmup_num_steps, warmup_type)
        self.optimizer = optimizer
        if warmup_max_lr is None:
            # DeepSpeed: each group warms up to its own lr (read once, at construction).
            warmup_max_lr = [float(g["lr"]) for g in optimizer.param_groups]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs, strict=True)]
        self.warmup_num_steps = max(2, warmup_num_steps)  # DeepSpeed: log(1) would divide by zero
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _update_lr(optimizer.param_groups, self.get_lr())

    def _warmup_gamma(self) -> float:
        if self.warmup_type == WARMUP_LOG_RATE:
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return 1.0

    def get_lr(self) -> list[float]:
        """DeepSpeed: ``min_lr + (max_lr - min_lr) * gamma``; before the first step, ``min_lr``."""
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._get_gamma()
        return [lo + d * gamma for lo, d in zip(self.min_lrs, self.delta_lrs, strict=True)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``."""

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return max(
            0.0,
            float(self.total_num_steps - self.last_batch_iteration)
            / float(max(1.0, self.total_num_steps - self.warmup_num_steps)),
        )


class WarmupCosineLR(_Schedule):
    """Warm the lr ratio from ``warmup_min_ratio`` to 1, then cosine-decay it to ``cos_min_ratio`` (times the base lr)."""

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        _check_warmup(warmup_num_steps, warmup_type)
        self.optimizer = optimizer
        self.total_num_steps = total_num_steps
        self.last_batch_iteration = last_batch_iteration
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = warmup_type
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        # The base lr is the optimizer's lr at construction (DeepSpeed's org_lrs).
        self.org_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self._last_lr = _update_lr(optimizer.param_groups, self.get_lr())

    def get_lr_ratio(self) -> float:
        """The multiplier of the base lr at ``last_batch_iteration``."""
        if self.last_batch_iteration < 0:
            return 0.0
        if self.last_batch_iteration < self.warmup_num_steps:
            if self.warmup_type == WARMUP_LOG_RATE:
                ratio = self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
            else:
                ratio = self.last_batch_iteration / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = self.last_batch_iteration - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ratio)

    def get_lr(self) -> list[float]:
        """``base_lr * get_lr_ratio()`` for every group."""
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The step counter and the base lrs (they are read from the optimizer only once)."""
        return {"last_batch_iteration": self.last_batch_iteration, "org_lrs": list(self.org_lrs)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the counter (and base lrs) and re-apply the lr."""
        if "org_lrs" in sd:
            self.org_lrs = list(sd["org_lrs"])
        super().load_state_dict(sd)


class LRRangeTest(_Schedule):
    """Grow the lr from ``lr_range_test_min_lr`` by ``step_rate`` per ``step_size`` steps (continuous or staircase)."""

    def __init__(
        self,
        optimizer: Any,
        lr_range_test_min_lr: float | list[float] = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = optimizer
        self.min_lr = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = _positive_int(lr_range_test_step_size, "lr_range_test_step_size")
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _update_lr(optimizer.param_groups, list(self.min_lr))

    def _interval(self) -> float:
        x = float(self.last_batch_iteration + 1) / self.step_size
        return math.floor(x) if self.staircase else x

    def get_lr(self) -> list[float]:
        """``min_lr * (1 + step_rate * interval)``."""
        increase = 1 + self.step_rate * self._interval()
        return [lr * increase for lr in self.min_lr]


class OneCycle(_Schedule):
    """1Cycle: lr up from ``cycle_min_lr`` to ``cycle_max_lr`` and back (momentum inversely), then optional decay."""

    def __init__(
        self,
        optimizer: Any,
        cycle_min_lr: float | list[float],
        cycle_max_lr: float | list[float],
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float | list[float] = 0.8,
        cycle_max_mom: float | list[float] = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = optimizer
        # DeepSpeed's checks: a zero first half would divide by zero (step_ratio); the second may be 0.
        first = float(_positive_int(cycle_first_step_size, "cycle_first_step_size"))
        if cycle_second_step_size is not None and (
            isinstance(cycle_second_step_size, bool)
            or not isinstance(cycle_second_step_size, int)
            or cycle_second_step_size < 0
        ):
            raise ValueError(
                f"scheduler.params.cycle_second_step_size must be an integer >= 0, got {cycle_second_step_size!r}"
            )
        if not isinstance(decay_step_size, int | float) or isinstance(decay_step_size, bool) or decay_step_size < 0:
            raise ValueError(f"scheduler.params.decay_step_size must be >= 0, got {decay_step_size!r}")
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_step_size, self.second_step_size = first, second
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (
            cycle_first_stair_count if cycle_second_stair_count is None else cycle_second_stair_count
        )
        self.decay_step_size = decay_step_size
        skip_decay = math.isclose(decay_step_size, 0)
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = skip_decay or math.isclose(decay_lr_rate, 0)
        if last_batch_iteration == -1:
            _update_lr(optimizer.param_groups, self.min_lrs)
        # Momentum cycles only for optimizers with Adam-style betas (DeepSpeed disables it otherwise).
        self.cycle_momentum = cycle_momentum and all("betas" in g for g in optimizer.param_groups)
        if self.cycle_momentum:
            self.decay_mom_rate = decay_mom_rate
            self.min_moms = [(m, 0.99) for m in _per_group(optimizer, cycle_min_mom, "cycle_min_mom")]
            self.max_moms = [(m, 0.99) for m in _per_group(optimizer, cycle_max_mom, "cycle_max_mom")]
            self.skip_mom_decay = skip_decay or math.isclose(decay_mom_rate, 0)
            if last_batch_iteration == -1:
                for mom, group in zip(self.min_moms, optimizer.param_groups, strict=True):
                    group["betas"] = mom
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups
        ]

    def _get_scale_factor(self) -> float:
        batch_iteration = self.last_batch_iteration + 1
        cycle = math.floor(1 + batch_iteration / self.total_size)
        x = 1.0 + batch_iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
            stair_count = self.first_stair_count
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
            stair_count = self.second_stair_count
        if stair_count > 0:
            # Quantise from the integer offset, as DeepSpeed does, so a stair boundary is exact.
            cycle_iteration = batch_iteration % self.total_size
            if cycle_iteration <= self.first_step_size:
                position = cycle_iteration * stair_count / self.first_step_size
            else:
                position = (self.total_size - cycle_iteration) * stair_count / self.second_step_size
            scale_factor = math.floor(position) / stair_count
        return scale_factor

    def get_lr(self) -> list[float]:
        """The cycle lr while in the cycle, then the decayed minimum."""
        if self.last_batch_iteration < self.total_size:
            s = self._get_scale_factor()
            return [lo + (hi - lo) * s for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [lo / (1 + self.decay_lr_rate * interval) for lo in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]] | None:
        """The (beta1, beta2) pairs for the current step, or None when momentum is not cycled."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            s = self._get_scale_factor()
            return [(hi[0] - (hi[0] - lo[0]) * s, lo[1]) for lo, hi in zip(self.min_moms, self.max_moms, strict=True)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [(b0 * (1 + self.decay_mom_rate * interval), b1) for b0, b1 in self.max_moms]

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one step: set lr (and betas when momentum cycles)."""
        super().step(last_batch_iteration)
        moms = self.get_mom()
        if moms is not None:
            for group, mom in zip(self.optimizer.param_groups, moms, strict=True):
                group["betas"] = mom

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the counter and re-apply lr and momentum."""
        self.step(int(sd["last_batch_iteration"]))


SCHEDULERS: dict[str, type[_Schedule]] = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle,
    "LRRangeTest": LRRangeTest,
}


# torch schedulers a ds_config can name (DeepSpeed falls back to torch.optim.lr_scheduler by name). Left
# out: those that need Python objects (LambdaLR/MultiplicativeLR: functions, SequentialLR/ChainedScheduler:
# other schedulers) and ReduceLROnPlateau, whose step() needs the metric the engine does not have.
_TORCH_EXCLUDED = {
    "LambdaLR",
    "MultiplicativeLR",
    "SequentialLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
    "LRScheduler",
}


def torch_scheduler_names() -> list[str]:
    """The ``torch.optim.lr_scheduler`` classes ``"scheduler": {"type": ...}`` may name."""
    from torch.optim import lr_scheduler as tls

    return sorted(
        n
        for n, c in vars(tls).items()
        if isinstance(c, type) and issubclass(c, tls.LRScheduler) and n not in _TORCH_EXCLUDED and not n.startswith("_")
    )


def scheduler_class(name: str) -> type:
    """DeepSpeed's schedule ``name``, else the torch.optim.lr_scheduler class of that name (KeyError if neither)."""
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    if name in torch_scheduler_names():
        from torch.optim import lr_scheduler as tls

        return getattr(tls, name)
    raise KeyError(name)


def scheduler_param_names(name: str) -> dict[str, bool]:
    """``{param: required}`` for a scheduler type (what ``scheduler.params`` may hold)."""
    sig = inspect.signature(scheduler_class(name).__init__)
    return {
        p: spec.default is inspect.Parameter.empty
        for p, spec in sig.parameters.items()
        if p not in ("self", "optimizer", "last_batch_iteration", "last_epoch", "verbose")
        and spec.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def build_scheduler(name: str, optimizer: Any, params: dict[str, Any]) -> Any:
    """Construct scheduler ``name`` over ``optimizer`` with ds_config ``params`` (already validated).

    A torch scheduler needs a ``torch.optim.Optimizer``: zero-shard's optimizer is one.
    """
    return scheduler_class(name)(optimizer, **params)
