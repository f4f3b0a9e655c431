"""offload-io: ZeRO-Offload to CPU and ZeRO-Infinity to NVMe: pinned buffer pools, tensor swapping with prefetch."""

# Fails here, with what to install, when ds-native is missing or built for another ABI.
from offload_io import _native  # noqa: F401  # isort: skip


from offload_io.config import AioConfig, OffloadDevice, OffloadOptimizerConfig, OffloadParamConfig

__version__ = "0.1.0"

__all__ = ["AioConfig", "OffloadDevice", "OffloadOptimizerConfig", "OffloadParamConfig", "__version__"]
