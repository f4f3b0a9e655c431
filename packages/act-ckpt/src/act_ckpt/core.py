"""Checkpointing a function: the :class:`Checkpointer`, the process-wide default and ``configure``.

Everything runs on ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``; act-ckpt adds only
what torch leaves out, each through a public extension point of it:

* selective policies -> ``context_fn=create_selective_checkpoint_contexts(...)``;
* replayed random ops (``random_ops="replay"``) -> two ``TorchDispatchMode``s in the same
  ``context_fn`` contexts (see [Note: random ops, redrawn or replayed] in :mod:`act_ckpt.random_ops`);
* the model-parallel RNG tracker -> the same ``context_fn``: a snapshot of the tracker's streams
  at the forward, restored around the recompute (torch restores only the default generators);
* partitioned / CPU-offloaded region inputs -> saved-tensor hooks around the call
  (see [Note: how a region's inputs are saved] in :mod:`act_ckpt.saved`);
* ``synchronize_checkpoint_boundary`` / ``profile`` -> the ``context_fn`` contexts again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as _torch_checkpoint
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from act_ckpt.config import ActivationCheckpointingConfig, parse_activation_checkpointing
from act_ckpt.policies import PolicyFn, resolve_policy
from act_ckpt.random_ops import RANDOM_OPS, RandomStore, RecordRandom, ReplayRandom
from act_ckpt.rng import get_rng_tracker
from act_ckpt.saved import RegionInputHooks, report_random_store, report_sac_storage

__all__ = [
    "Checkpointer",
    "checkpoint",
    "configure",
    "get_checkpointer",
    "is_configured",
    "profile_summary",
    "reset_configuration",
    "reset_profile",
]

logger = logging.getLogger("act_ckpt")


# ---------------------------------------------------------------------------------------------
# Profiling (the `profile` key): wall-clock time of every checkpointed forward and recompute.


@dataclass
class _Stat:
    count: int = 0
    seconds: float = 0.0


_PROFILE: dict[str, _Stat] = {}


def profile_summary() -> dict[str, dict[str, float]]:
    """``{"forward": {"count": n, "seconds": s}, "recompute": {...}}`` summed since the last reset."""
    return {name: {"count": s.count, "seconds": s.seconds} for name, s in _PROFILE.items()}


def reset_profile() -> None:
    """Forget the times :func:`profile_summary` reports."""
    _PROFILE.clear()


def _synchronize() -> None:
    # On CPU every op has finished when it returns: nothing to wait for.
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


class _Boundary:
    """Synchronize and/or time one checkpointed forward or recompute."""

    def __init__(self, phase: str, synchronize: bool, profile: bool) -> None:
        self.phase, self.synchronize, self.profile = phase, synchronize, profile
        self.t0 = 0.0

    def __enter__(self) -> None:
        if self.synchronize:
            _synchronize()
        if self.profile:
            if not self.synchronize and torch.accelerator.is_available():
                _synchronize()  # times of asynchronous work mean nothing unsynchronized
            self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.synchronize or (self.profile and torch.accelerator.is_available()):
            _synchronize()
        if self.profile:
            dt = time.perf_counter() - self.t0
            stat = _PROFILE.setdefault(self.phase, _Stat())
            stat.count += 1
            stat.seconds += dt
            logger.info("act_ckpt %s: %.3f ms", self.phase, dt * 1e3)


class _RestoreTracker:
    """Around the recompute: the RNG tracker's streams as they were at the forward."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.outside: dict[str, Any] | None = None

    def __enter__(self) -> None:
        tracker = get_rng_tracker()
        self.outside = tracker.get_states()
        tracker.set_states(self.snapshot)

    def __exit__(self, *exc: object) -> None:
        get_rng_tracker().set_states(self.outside or {})


class _Stack:
    """Enter several context managers as one (a fresh ExitStack each time it is entered)."""

    def __init__(self, *contexts: Any) -> None:
        self.contexts = [c for c in contexts if c is not None]
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        for c in self.contexts:
            stack.enter_context(c)
        self._stacks.append(stack)

    def __exit__(self, *exc: Any) -> bool:
        return self._stacks.pop().__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# The Checkpointer


@dataclass(frozen=True)
class Checkpointer:
    """How to checkpoint: call it like ``torch.utils.checkpoint.checkpoint`` (``ckpt(fn, *args, **kwargs)``).

    - ``policy``: None for full checkpointing (only the region's inputs are kept, everything
      inside is recomputed), or selective: a name (``"save_matmuls"``,
      ``"recompute_attention_core"``), a torch policy function, or a list of aten ops to save.
    - ``partition_group``: a process group (model-parallel ranks holding the same activations);
      each rank keeps 1/N of every saved region input, all-gathered for the recompute.
    - ``cpu_checkpointing``: keep the saved region inputs in host memory (pinned when
      ``pin_memory``, by default when CUDA is available).
    - ``synchronize``: device synchronize at the start and end of every checkpointed forward and
      recompute. ``profile``: time them (see :func:`profile_summary`; logged on ``act_ckpt``).
    - ``preserve_rng_state``: restore the RNG states (default generators and the RNG tracker's
      streams) for the recompute, so dropout redraws the forward's masks. Leave it on.
    - ``determinism_check``: torch's check that the recompute saved the same tensors
      (``"default"`` or ``"none"``).
    - ``random_ops``: how the recompute gets the forward's random numbers (dropout masks), for
      all random ops of a region alike (see [Note: random ops, redrawn or replayed] in
      :mod:`act_ckpt.random_ops`): ``"recompute"`` redraws them from the restored RNG state (no
      memory, drawing time twice); ``"replay"`` keeps what the forward drew (dropout masks as
      ``bool``, 1 byte per element) and writes it back (one backward per forward, like torch's
      selective checkpointing). ``"auto"`` (default): ``"replay"`` for selective policies on CPU
      inputs, where drawing costs as much as the rest of the recompute; ``"recompute"`` for full
      checkpointing (only region inputs kept) and on accelerators (cheap fused dropout).
    """

    policy: str | PolicyFn | Iterable[Any] | None = None
    partition_group: Any | None = None
    cpu_checkpointing: bool = False
    pin_memory: bool | None = None
    synchronize: bool = False
    profile: bool = False
    preserve_rng_state: bool = True
    determinism_check: str = "default"
    random_ops: str = "auto"
    _policy_fn: PolicyFn | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_policy_fn", resolve_policy(self.policy))
        if self.determinism_check not in ("default", "none"):
            raise ValueError(f"determinism_check must be 'default' or 'none', got {self.determinism_check!r}")
        if self.random_ops not in ("auto", *RANDOM_OPS):
            raise ValueError(f"random_ops must be 'auto', 'recompute' or 'replay', got {self.random_ops!r}")
        if self.partition_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("partition_group was given but torch.distributed is not initialized")

    def __deepcopy__(self, memo: dict[int, Any]) -> Checkpointer:
        return self  # immutable, and process groups cannot be copied

    @classmethod
    def from_config(
        cls,
        config: ActivationCheckpointingConfig | dict[str, Any] | None = None,
        group: Any | None = None,
        *,
        policy: str | PolicyFn | Iterable[Any] | None = None,
    ) -> Checkpointer:
        """A Checkpointer for the ``activation_checkpointing`` section, partitioning over ``group``."""
        cfg = parse_activation_checkpointing(config)
        cfg.check_consistent()
        if cfg.contiguous_memory_optimization:
            logger.info("act_ckpt: contiguous_memory_optimization/number_checkpoints are accepted; no-ops here")
        partition_group = None
        if cfg.partition_activations:
            if group is None:
                warnings.warn(
                    "activation_checkpointing.partition_activations=true but no model-parallel group was "
                    "given (configure(..., group=...)): activations are not partitioned, as in DeepSpeed "
                    "without an mpu",
                    stacklevel=3,
                )
            else:
                partition_group = group
        return cls(
            policy=policy,
            partition_group=partition_group,
            cpu_checkpointing=cfg.cpu_checkpointing,
            synchronize=cfg.synchronize_checkpoint_boundary,
            profile=cfg.profile,
        )

    def _replays_random_ops(self, args: tuple[Any, ...]) -> bool:
        """Whether a region called with ``args`` replays its random ops (resolves ``random_ops="auto"``)."""
        if self.random_ops != "auto":
            return self.random_ops == "replay"
        if self._policy_fn is None:
            return False
        return not any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)

    def _contexts(self, replay: bool = False) -> tuple[Any, Any]:
        """torch's ``context_fn``: the contexts of one forward and of its recompute."""
        fwd_sac = rec_sac = record = replayer = None
        if self._policy_fn is not None:
            fwd_sac, rec_sac = create_selective_checkpoint_contexts(self._policy_fn)
            report_sac_storage(fwd_sac.storage)
        if replay:
            store = RandomStore()
            record, replayer = RecordRandom(store), ReplayRandom(store)
            report_random_store(store)
        restore = _RestoreTracker(get_rng_tracker().get_states()) if self.preserve_rng_state else None
        # The random-op modes go in before (below) torch's selective modes: see the note in act_ckpt.random_ops.
        forward = _Stack(_Boundary("forward", self.synchronize, self.profile), record, fwd_sac)
        recompute = _Stack(restore, _Boundary("recompute", self.synchronize, self.profile), replayer, rec_sac)
        return forward, recompute

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` checkpointed; returns what ``fn`` returns."""
        if kwargs:
            # Keyword tensors become positional so they are saved (and partitioned/offloaded) like
            # the others; torch would keep them in a closure. This also frees the keyword names
            # torch's checkpoint reserves (context_fn, debug, ...) for fn's own use.
            fn, args = _flatten_kwargs(fn, args, kwargs)
        hooks = RegionInputHooks(self.partition_group, self.cpu_checkpointing, self.pin_memory)
        with hooks if hooks.active else contextlib.nullcontext():
            return _torch_checkpoint(
                fn,
                *args,
                use_reentrant=False,
                context_fn=functools.partial(self._contexts, self._replays_random_ops(args)),
                preserve_rng_state=self.preserve_rng_state,
                determinism_check=self.determinism_check,
            )


def _flatten_kwargs(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple]:
    keys = tuple(kwargs)
    n = len(args)

    def call(*all_args: Any) -> Any:
        return fn(*all_args[:n], **dict(zip(keys, all_args[n:], strict=False)))

    return call, (*args, *kwargs.values())


# ---------------------------------------------------------------------------------------------
# The process-wide default (what `checkpoint()` and DeepSpeed-style code use)

_DEFAULT = Checkpointer()
_CONFIGURED = False


def configure(
    config: ActivationCheckpointingConfig | dict[str, Any] | None = None,
    group: Any | None = None,
    *,
    policy: str | PolicyFn | Iterable[Any] | None = None,
) -> Checkpointer:
    """Set the process-wide default from the ``activation_checkpointing`` section; returns it.

    ``group`` is the model-parallel process group that ``partition_activations`` splits saved
    inputs across (ranks that hold the same activations: tensor-parallel peers, never
    data-parallel ones). ``policy`` makes every :func:`checkpoint` call selective.
    """
    global _DEFAULT, _CONFIGURED
    _DEFAULT = Checkpointer.from_config(config, group, policy=policy)
    _CONFIGURED = True
    return _DEFAULT


def get_checkpointer() -> Checkpointer:
    """The process-wide default Checkpointer (full checkpointing until :func:`configure`)."""
    return _DEFAULT


def is_configured() -> bool:
    """True once :func:`configure` has been called (and not reset)."""
    return _CONFIGURED


def reset_configuration() -> None:
    """Back to the unconfigured default (full checkpointing, nothing partitioned or offloaded)."""
    global _DEFAULT, _CONFIGURED
    _DEFAULT = Checkpointer()
    _CONFIGURED = False


def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` checkpointed with the process-wide default (see :func:`configure`)."""
    return _DEFAULT(fn, *args, **kwargs)
