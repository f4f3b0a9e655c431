"""offload-io: ZeRO-Offload to CPU and ZeRO-Infinity to NVMe: pinned buffer pools, tensor swapping with prefetch."""

__version__ = "0.1.0"

__all__ = ["__version__"]
