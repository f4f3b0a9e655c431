"""act-ckpt: activation checkpointing — full, selective, partitioned and CPU-offloaded, with model-parallel RNG tracking."""

from act_ckpt.config import ActivationCheckpointingConfig, parse_activation_checkpointing

__version__ = "0.1.0"

__all__ = ["ActivationCheckpointingConfig", "__version__", "parse_activation_checkpointing"]
