"""offload-io: ZeRO-Offload to CPU and ZeRO-Infinity to NVMe: pinned buffer pools, tensor swapping with prefetch."""

from offload_io.config import AioConfig, OffloadDevice, OffloadOptimizerConfig, OffloadParamConfig

__version__ = "0.1.0"

__all__ = ["AioConfig", "OffloadDevice", "OffloadOptimizerConfig", "OffloadParamConfig", "__version__"]
