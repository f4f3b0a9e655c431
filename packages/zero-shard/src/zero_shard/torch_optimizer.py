"""What makes :class:`~zero_shard.optimizer.ZeroShardedOptimizer` a ``torch.optim.Optimizer``.

torch's learning-rate schedulers (``LambdaLR``, ``StepLR``, ``OneCycleLR``...) refuse anything that is
not an ``Optimizer`` instance, and Hugging Face / DeepSpeed-Chat scripts build them over the optimizer
that ``initialize()`` returns. The ZeRO optimizer is one: it subclasses ``torch.optim.Optimizer`` and
*shares* the inner optimizer's objects instead of copying them:

- ``param_groups`` is the inner optimizer's list (the same dicts), so ``group["lr"] = x`` or a torch
  scheduler changes what the next step uses; each group's ``"params"`` holds the fp32 master partition
  (one flat tensor per group), not the model's parameters;
- ``state`` is the inner optimizer's state (keyed by those partitions), ``defaults`` its defaults
  (so ``OneCycleLR`` finds ``betas``/``momentum``);
- ``step()`` runs torch's step pre/post hooks (``register_step_pre_hook``) around the ZeRO step.

``state_dict()`` is *this rank's* state (DeepSpeed's ZeRO optimizers behave the same way): the inner
optimizer's torch state dict over the partition, the fp32 master partitions, the loss scaler and the
layout it was taken under. Unlike torch's, it is a snapshot (every tensor cloned): the masters are views
into buffers the next step overwrites, and a state dict that changed under its holder would not resume. ``load_state_dict()`` takes it back on the same stage, world size, rank and
parameter layout, on every rank together (it re-shares the parameters, a collective). To save and
resume across world sizes or stages use the sharded checkpoint (``sharded_state`` /
``load_sharded_state``, what ``engine.save_checkpoint`` writes).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["STATE_DICT_FORMAT", "TorchOptimizerFacade"]

STATE_DICT_FORMAT = "zero-shard/rank-state/1"


def _snapshot(value: Any) -> Any:
    """A copy whose tensors are cloned: torch's state_dict holds references that the next step changes."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return value


class TorchOptimizerFacade(torch.optim.Optimizer):
    """Base of ZeroShardedOptimizer: the ``torch.optim.Optimizer`` interface over ``self.inner``.

    Subclasses set ``inner``, ``masters``, ``layouts``, ``stage``, ``rank``, ``world_size`` and
    ``loss_scaler``, then call :meth:`_init_torch_optimizer`. ``torch.optim.Optimizer.__init__`` is
    not called: it would build param groups of its own, and ours must stay the inner optimizer's.
    """

    inner: torch.optim.Optimizer

    def _init_torch_optimizer(self) -> None:
        """The attributes ``torch.optim.Optimizer.__init__`` would set, minus its own param groups."""
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        # Wraps type(self).step once so step pre/post hooks and the profiler label run, as for any optimizer.
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    # The shared objects: properties, so that a rebuilt inner optimizer stays in view.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's param groups (the same dicts): set ``group["lr"]`` to schedule."""
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's state (keyed by the fp32 master partitions)."""
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's defaults (``lr``, ``betas``...)."""
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: the flat partitions are fixed when the optimizer is built."""
        raise NotImplementedError(
            "ZeroShardedOptimizer.add_param_group: parameters are flattened and partitioned at construction; "
            "pass every group to initialize() (model_parameters=[{'params': ..., 'lr': ...}, ...])"
        )

    def _layout_signature(self) -> list[list[Any]]:
        return [[[s.name, list(s.shape)] for s in lay.slots] for lay in self.layouts]  # type: ignore[attr-defined]

    def _all_resident(self, write: bool = False) -> Any:
        """Context: every master and its state in memory (NVMe offload keeps them in swap files otherwise)."""
        off = getattr(self, "offload", None)
        return off.all_resident(write) if off is not None else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: see the module docstring (same stage/world size/rank to load it back)."""
        with self._all_resident():
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_DICT_FORMAT,
            "zero_stage": self.stage,  # type: ignore[attr-defined]
            "partition_count": self.world_size,  # type: ignore[attr-defined]
            "rank": self.rank,  # type: ignore[attr-defined]
            "layout": self._layout_signature(),
            "base_optimizer_state": _snapshot(self.inner.state_dict()),
            "fp32_master": [m.detach().clone() for m in self.masters],  # type: ignore[attr-defined]
            "loss_scaler": self.loss_scaler.state_dict(),  # type: ignore[attr-defined]
            "global_steps": self.global_steps,  # type: ignore[attr-defined]
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same stage, world size, rank and layout; every rank calls it)."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_DICT_FORMAT:
            got = state_dict.get("format") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"ZeroShardedOptimizer.load_state_dict: not a ZeroShardedOptimizer state dict (format {got!r}, "
                f"expected {STATE_DICT_FORMAT!r}); a plain torch optimizer's state dict cannot be loaded here"
            )
        mine = {"zero_stage": self.stage, "partition_count": self.world_size, "rank": self.rank}  # type: ignore[attr-defined]
        for key, value in mine.items():
            if state_dict[key] != value:
                raise ValueError(
                    f"ZeroShardedOptimizer.load_state_dict: saved {key}={state_dict[key]}, this optimizer has {value}; "
                    "a rank's state dict loads only into the same stage, world size and rank "
                    "(use engine.load_checkpoint to change them)"
                )
        if state_dict["layout"] != self._layout_signature():
            raise ValueError(
                "ZeroShardedOptimizer.load_state_dict: the saved parameter names/shapes differ from this model's"
            )
        with self._all_resident(write=True), torch.no_grad():
            for master, saved in zip(self.masters, state_dict["fp32_master"], strict=True):  # type: ignore[attr-defined]
                master.copy_(saved)
            self.inner.load_state_dict(_snapshot(state_dict["base_optimizer_state"]))  # ours stays reusable
        self.loss_scaler.load_state_dict(state_dict["loss_scaler"])  # type: ignore[attr-defined]
        self.global_steps = int(state_dict["global_steps"])  # type: ignore[attr-defined]
        self._refresh_model()  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("ZeroShardedOptimizer cannot be pickled or deep-copied (it holds process-group state)")
