"""ds-native: zero-all's compiled kernels.

The CPU kernels live in ``_ds_native_cpu`` (always built; AVX-512 / AVX2 /
scalar chosen at run time). The CUDA kernels live in ``_ds_native_cuda``,
built when a CUDA compiler was found and imported only when a CUDA tensor
needs them, so ``import ds_native`` works on machines without CUDA.

Optimizers over these kernels live in ``ds_native.optim`` (``CPUAdam``,
``FusedAdam``, ``cpu_adam_step``); async file IO (io_uring / kernel AIO / thread
pool, O_DIRECT) in ``ds_native.aio`` (module ``_ds_native_aio``).
"""

from __future__ import annotations

from ds_native._build import ABI_VERSION, __version__, build_info, check_compatible
from ds_native.isa import active_isa, detected_isa, forced_isa, set_isa
from ds_native.ops import multi_tensor_l2_norm

__all__ = [
    "ABI_VERSION",
    "__version__",
    "active_isa",
    "build_info",
    "check_compatible",
    "detected_isa",
    "forced_isa",
    "multi_tensor_l2_norm",
    "set_isa",
]
