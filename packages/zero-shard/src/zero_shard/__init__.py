"""zero-shard: ZeRO stages 1, 2 and 3: partitioned optimizer states, gradients and parameters over torch.distributed."""

from zero_shard.config import ZeroConfig

__version__ = "0.1.0"

__all__ = ["ZeroConfig", "__version__"]
