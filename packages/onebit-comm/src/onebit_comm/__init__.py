"""onebit-comm: error-compensated 1-bit compressed all-reduce, and 1-bit Adam, 0/1 Adam, 1-bit LAMB.

Works on any torch.distributed backend (gloo on CPU, NCCL on GPUs):

- :func:`compressed_allreduce` averages a tensor over a group with sign bits packed 8 per byte plus
  one fp32 scale per chunk, in two phases with worker- and server-side error feedback;
- :class:`OneBitAdam`, :class:`ZeroOneAdam`, :class:`OneBitLamb` are torch optimizers that do
  their own gradient communication (``communicates_gradients = True``), configured with DeepSpeed's
  parameter names.
"""

from onebit_comm.allreduce import CommStats, PendingErrors, compressed_allreduce, error_buffers
from onebit_comm.compress import compressed_bytes, fp32_allreduce_bytes, reference_compressed_allreduce
from onebit_comm.optim import COMM_BACKEND_NAMES, CompressedOptimizer, OneBitAdam, OneBitLamb, ZeroOneAdam

__version__ = "0.1.0"

__all__ = [
    "COMM_BACKEND_NAMES",
    "CommStats",
    "CompressedOptimizer",
    "OneBitAdam",
    "OneBitLamb",
    "PendingErrors",
    "ZeroOneAdam",
    "__version__",
    "compressed_allreduce",
    "compressed_bytes",
    "error_buffers",
    "fp32_allreduce_bytes",
    "reference_compressed_allreduce",
]
