"""act-ckpt: Activation checkpointing: full, selective, partitioned and CPU-offloaded, with model-parallel RNG tracking."""

__version__ = "0.1.0"

__all__ = ["__version__"]
