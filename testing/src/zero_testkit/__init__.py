"""Test helpers shared by every zero-all package (not shipped to users).

``run_distributed(fn, world_size)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` real processes joined by a gloo (or NCCL) process group, and
fails with every rank's traceback instead of hanging. :mod:`zero_testkit.devices`
says which devices a test can use here (cpu always, cuda when present) and
skips with the reason otherwise; :mod:`zero_testkit.plugin` is the pytest
plugin that provides the ``device`` fixture.
"""

from zero_testkit.devices import (
    cuda_marks,
    cuda_only,
    cuda_skip_reason,
    device_params,
    ds_native_cuda_only,
    ds_native_cuda_skip_reason,
    gpu_count,
    requires_gpus,
)
from zero_testkit.distributed import DistributedTestError, free_port, run_distributed

__all__ = [
    "DistributedTestError",
    "cuda_marks",
    "cuda_only",
    "cuda_skip_reason",
    "device_params",
    "ds_native_cuda_only",
    "ds_native_cuda_skip_reason",
    "free_port",
    "gpu_count",
    "requires_gpus",
    "run_distributed",
]
