"""offload-io: ZeRO-Offload to CPU and ZeRO-Infinity to NVMe: pinned buffer pools, tensor swapping with prefetch.

Public API: the config sections (:class:`OffloadOptimizerConfig`, :class:`OffloadParamConfig`,
:class:`AioConfig`), the IO handle (:func:`open_handle`, :func:`aligned_empty`), :class:`BufferPool`,
:class:`ScratchDir`, :class:`TensorSwapper`, :class:`SwappedOptimizerState` (Adam state on NVMe) and
:class:`SwappedParams` (stage-3 parameter shards on NVMe). zero-shard wires them into its optimizer.
"""

# Fails here, with what to install, when ds-native is missing or built for another ABI.
from offload_io import _native  # noqa: F401  # isort: skip


from offload_io.buffers import BufferPool
from offload_io.config import AioConfig, OffloadDevice, OffloadOptimizerConfig, OffloadParamConfig
from offload_io.io import SwapIOError, aligned_empty, open_handle
from offload_io.optimizer_state import SwappedOptimizerState
from offload_io.param_state import SwappedParams
from offload_io.scratch import ScratchDir
from offload_io.swapper import TensorSwapper

__version__ = "0.1.0"

__all__ = [
    "AioConfig",
    "BufferPool",
    "OffloadDevice",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "ScratchDir",
    "SwapIOError",
    "SwappedOptimizerState",
    "SwappedParams",
    "TensorSwapper",
    "__version__",
    "aligned_empty",
    "open_handle",
]
