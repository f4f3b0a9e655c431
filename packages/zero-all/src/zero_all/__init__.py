"""zero-all: DeepSpeed-compatible training engine for PyTorch: config, initialize(), the engine, pickle-free checkpoints."""

__version__ = "0.1.0"

__all__ = ["__version__"]
