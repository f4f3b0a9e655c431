"""act-ckpt: activation checkpointing — full, selective, partitioned and CPU-offloaded, with model-parallel RNG tracking.

Quick tour::

    import act_ckpt

    y = act_ckpt.checkpoint(block, x, mask=mask)              # full checkpointing of one call
    act_ckpt.apply_activation_checkpointing(model, every=2)   # every 2nd block, in place
    act_ckpt.checkpoint_wrapper(block, policy="save_matmuls") # selective checkpointing
    act_ckpt.configure({"partition_activations": True, "cpu_checkpointing": True}, group=tp_group)

DeepSpeed's ``deepspeed.checkpointing`` API is :mod:`act_ckpt.checkpointing`.
"""

from act_ckpt import checkpointing  # DeepSpeed's deepspeed.checkpointing API
from act_ckpt.config import ActivationCheckpointingConfig, parse_activation_checkpointing
from act_ckpt.core import (
    Checkpointer,
    checkpoint,
    configure,
    get_checkpointer,
    is_configured,
    profile_summary,
    reset_configuration,
    reset_profile,
)
from act_ckpt.policies import attention_core, recompute_attention_core, save_matmuls, save_ops
from act_ckpt.rng import RNGStatesTracker, get_rng_tracker, model_parallel_manual_seed
from act_ckpt.saved import SavedActivationMeter
from act_ckpt.wrap import CheckpointedModule, apply_activation_checkpointing, checkpoint_wrapper, unwrap

__version__ = "0.1.0"

__all__ = [
    "ActivationCheckpointingConfig",
    "CheckpointedModule",
    "Checkpointer",
    "RNGStatesTracker",
    "SavedActivationMeter",
    "__version__",
    "apply_activation_checkpointing",
    "attention_core",
    "checkpoint",
    "checkpoint_wrapper",
    "checkpointing",
    "configure",
    "get_checkpointer",
    "get_rng_tracker",
    "is_configured",
    "model_parallel_manual_seed",
    "parse_activation_checkpointing",
    "profile_summary",
    "recompute_attention_core",
    "reset_configuration",
    "reset_profile",
    "save_matmuls",
    "save_ops",
    "unwrap",
]
