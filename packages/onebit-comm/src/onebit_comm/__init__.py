"""onebit-comm: Error-compensated compressed communication: 1-bit Adam, 0/1 Adam, 1-bit LAMB on any torch.distributed backend."""

__version__ = "0.1.0"

__all__ = ["__version__"]
