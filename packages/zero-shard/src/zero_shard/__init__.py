"""zero-shard: ZeRO stages 1, 2 and 3: partitioned optimizer states, gradients and parameters over torch.distributed."""

__version__ = "0.1.0"

__all__ = ["__version__"]
