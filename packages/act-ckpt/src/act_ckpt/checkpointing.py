"""DeepSpeed's ``deepspeed.checkpointing`` API on act-ckpt (so ``zero_all.checkpointing`` can be this module).

Same names and signatures as DeepSpeed 0.19: :func:`configure`, :func:`is_configured`,
:func:`checkpoint`, :func:`reset`, :func:`get_cuda_rng_tracker`,
:func:`model_parallel_cuda_manual_seed`, :class:`CudaRNGStatesTracker`,
:func:`partition_activations_in_checkpoint`, :func:`set_num_layers`. Differences, on purpose:

* the RNG tracker and the seeding cover the CPU generator too (DeepSpeed's are CUDA-only), so
  the same model-parallel dropout code runs on CPU;
* ``mpu_`` may also be a process group itself (DeepSpeed wants an object with
  ``get_tensor_model_parallel_group()`` or ``get_model_parallel_group()``, which also works);
* :func:`reset` has nothing to free: act-ckpt keeps no buffers outside autograd's graph
  (DeepSpeed frees its contiguous-checkpointing buffers there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from act_ckpt import core
from act_ckpt.config import ActivationCheckpointingConfig, parse_activation_checkpointing, section_of
from act_ckpt.rng import RNGStatesTracker, get_rng_tracker, model_parallel_manual_seed

__all__ = [
    "CudaRNGStatesTracker",
    "checkpoint",
    "configure",
    "get_cuda_rng_tracker",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "partition_activations_in_checkpoint",
    "reset",
    "set_num_layers",
]

CudaRNGStatesTracker = RNGStatesTracker
"""DeepSpeed's name for the tracker class (ours tracks the CPU generator as well)."""

_STATE: dict[str, Any] = {"config": ActivationCheckpointingConfig(), "group": None}


def _model_parallel_group(mpu: Any) -> Any | None:
    """The model-parallel group of a Megatron-style mpu object, or ``mpu`` if it is a group."""
    if mpu is None:
        return None
    for getter in ("get_tensor_model_parallel_group", "get_model_parallel_group"):
        if hasattr(mpu, getter):
            return getattr(mpu, getter)()
    return mpu  # a ProcessGroup


def _strip_json_comments(text: str) -> str:
    """Drop ``//`` and ``/* */`` comments outside strings (DeepSpeed's config files may have them)."""
    out, i, n, in_str = [], 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _read_ds_config(deepspeed_config: Any) -> dict[str, Any]:
    if isinstance(deepspeed_config, dict):
        return deepspeed_config
    if isinstance(deepspeed_config, (str, os.PathLike)):
        with open(deepspeed_config, encoding="utf-8") as f:
            return json.loads(_strip_json_comments(f.read()))
    raise ValueError(f"deepspeed_config must be a dict or a path to a JSON file, got {type(deepspeed_config).__name__}")


def configure(
    mpu_: Any,
    deepspeed_config: Any = None,
    partition_activations: bool | None = None,
    contiguous_checkpointing: bool | None = None,
    num_checkpoints: int | None = None,
    checkpoint_in_cpu: bool | None = None,
    synchronize: bool | None = None,
    profile: bool | None = None,
) -> None:
    """Configure activation checkpointing as ``deepspeed.checkpointing.configure`` does.

    Starts from the defaults, reads the ``activation_checkpointing`` section of
    ``deepspeed_config`` (a dict or a JSON file) when given, then applies the keyword overrides
    (each overrides the config, as in DeepSpeed). ``mpu_`` gives the model-parallel group that
    ``partition_activations`` splits saved inputs across (None: nothing to split).
    """
    section: dict[str, Any] = {}
    if deepspeed_config is not None:
        section = dict(section_of(_read_ds_config(deepspeed_config)) or {})
    overrides = {
        "partition_activations": partition_activations,
        "contiguous_memory_optimization": contiguous_checkpointing,
        "number_checkpoints": num_checkpoints,
        "cpu_checkpointing": checkpoint_in_cpu,
        "synchronize_checkpoint_boundary": synchronize,
        "profile": profile,
    }
    section.update({k: v for k, v in overrides.items() if v is not None})
    cfg = parse_activation_checkpointing(section)
    group = _model_parallel_group(mpu_) if mpu_ is not None else _STATE["group"]
    core.configure(cfg, group)
    _STATE.update(config=cfg, group=group)


def is_configured() -> bool:
    """True once :func:`configure` (or :func:`act_ckpt.configure`) has been called."""
    return core.is_configured()


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Checkpoint ``function(*args, **kwargs)`` with the configured settings."""
    return core.checkpoint(function, *args, **kwargs)


def reset() -> None:
    """DeepSpeed frees its contiguous-checkpointing buffers here; act-ckpt has none, so nothing to do."""


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process-wide RNG tracker (tracks the CPU generator and the accelerator's)."""
    return get_rng_tracker()


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default stream with ``seed`` and the model-parallel stream with ``seed + 2718 + tp_rank``.

    ``tp_rank`` is this rank's index in the model-parallel group given to :func:`configure`
    (0 when none was given).
    """
    model_parallel_manual_seed(seed, _STATE["group"])


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """Turn partitioning on or off, keeping the other settings."""
    cfg = _STATE["config"].model_copy(update={"partition_activations": bool(partition_activation)})
    core.configure(cfg, _STATE["group"])
    _STATE["config"] = cfg


def set_num_layers(nlayers: int) -> None:
    """DeepSpeed's ``number_checkpoints`` setter; accepted and recorded (a no-op, as the key is)."""
    _STATE["config"] = _STATE["config"].model_copy(update={"number_checkpoints": nlayers})
