"""Named RNG streams for model-parallel dropout (Megatron's/DeepSpeed's ``CudaRNGStatesTracker``).

Tensor-parallel ranks hold the same activations outside the parallel regions and shards of them
inside. Dropout outside must draw the *same* mask on every tensor-parallel rank (the default
generator, seeded alike), dropout inside a parallel region must draw *different* masks (a second
stream, seeded per rank). The tracker keeps such named streams and swaps one in for the duration
of ``with tracker.fork(name):``.

Unlike DeepSpeed's tracker, which swaps only the CUDA generator, a stream here holds the state of
the CPU generator and of the current accelerator's generator (when there is one), so the same
code draws per-rank masks on CPU (gloo tests, CPU training) and on CUDA.

Checkpointing and the tracker: a checkpointed region that forks a stream must see the stream as
it was at the original forward when it is recomputed. :mod:`act_ckpt.checkpoint` snapshots the
tracker's states (:meth:`RNGStatesTracker.get_states`) at every checkpointed forward and restores
them around the recompute, as DeepSpeed's ``CheckpointFunction`` does.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

__all__ = [
    "MODEL_PARALLEL_RNG",
    "RNGStatesTracker",
    "get_rng_tracker",
    "model_parallel_manual_seed",
]

MODEL_PARALLEL_RNG = "model-parallel-rng"
"""The stream :func:`model_parallel_manual_seed` adds (DeepSpeed/Megatron's name)."""

# The seed offset Megatron and DeepSpeed use for the model-parallel stream; kept so a seed gives
# the same per-rank streams' seeds as there (their streams are CUDA-only, so not the same masks).
_MODEL_PARALLEL_SEED_OFFSET = 2718

DeviceStates = dict[str, torch.Tensor]


def _accelerator_type() -> str | None:
    """The current accelerator's device type when one is usable ("cuda", ...), else None."""
    acc = torch.accelerator.current_accelerator(check_available=True)
    return acc.type if acc is not None else None


def _capture() -> DeviceStates:
    """The CPU generator's state and the current accelerator's (when there is one)."""
    states = {"cpu": torch.get_rng_state()}
    dev = _accelerator_type()
    if dev is not None:
        states[dev] = torch.get_device_module(dev).get_rng_state()
    return states


def _restore(states: DeviceStates) -> None:
    for dev, state in states.items():
        if dev == "cpu":
            torch.set_rng_state(state)
        else:
            torch.get_device_module(dev).set_rng_state(state)


def _seeded(seed: int) -> DeviceStates:
    """The generator states that ``seed`` gives, leaving the current states untouched."""
    saved = _capture()
    try:
        torch.manual_seed(seed)  # seeds the CPU generator and every accelerator's
        return _capture()
    finally:
        _restore(saved)


class RNGStatesTracker:
    """Named RNG streams; ``fork(name)`` draws from one and leaves the default stream untouched.

    Same methods as DeepSpeed's ``CudaRNGStatesTracker`` (``reset``, ``get_states``,
    ``set_states``, ``add``, ``fork``), so Megatron-style layers work unchanged.
    """

    def __init__(self) -> None:
        self.states_: dict[str, DeviceStates] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        """Forget every stream."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, DeviceStates]:
        """A copy of the name -> state mapping (state tensors are replaced, never mutated, so a
        shallow copy is a snapshot)."""
        return {name: dict(states) for name, states in self.states_.items()}

    def set_states(self, states: dict[str, DeviceStates]) -> None:
        """Replace every stream's state (e.g. with a snapshot from :meth:`get_states`)."""
        self.states_ = copy.copy(states)

    def add(self, name: str, seed: int) -> None:
        """Add stream ``name`` seeded with ``seed``; a name or seed used twice is an error."""
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker: seed {seed} is already used by another stream")
        if name in self.states_:
            raise ValueError(f"RNG tracker: stream {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = _seeded(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw random numbers from stream ``name`` inside the block; the default stream resumes after."""
        if name not in self.states_:
            known = ", ".join(sorted(self.states_)) or "none (call model_parallel_manual_seed or add)"
            raise KeyError(f"RNG tracker: no stream named {name!r}; streams: {known}")
        outside = _capture()
        _restore(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = _capture()
            _restore(outside)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (DeepSpeed: ``get_cuda_rng_tracker()``)."""
    return _TRACKER


def model_parallel_manual_seed(seed: int, group: object | None = None, *, tp_rank: int | None = None) -> None:
    """Seed the default stream with ``seed`` and the model-parallel stream per tensor-parallel rank.

    The default generators (CPU and accelerator) get ``seed``: the same on every rank of the
    model-parallel group, so dropout outside parallel regions agrees across it. The tracker's
    :data:`MODEL_PARALLEL_RNG` stream gets ``seed + 2718 + tp_rank`` (Megatron's/DeepSpeed's
    rule): different per tensor-parallel rank. ``tp_rank`` is this rank's index in ``group`` (a
    torch.distributed process group; 0 when None and torch.distributed is not initialized), or
    given directly. DeepSpeed: ``model_parallel_cuda_manual_seed(seed)``, which seeds only CUDA.
    """
    if tp_rank is None:
        tp_rank = _rank_in(group)
    _TRACKER.reset()
    torch.manual_seed(seed)
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _MODEL_PARALLEL_SEED_OFFSET + tp_rank)


def _rank_in(group: object | None) -> int:
    import torch.distributed as dist

    if group is None:
        return 0
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("a model-parallel group was given but torch.distributed is not initialized")
    return dist.get_rank(group)
