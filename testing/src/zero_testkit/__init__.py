"""Test helpers shared by every zero-all package (not shipped to users).

``run_distributed(fn, world_size)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` real processes joined by a gloo (or NCCL) process group, and
fails with every rank's traceback instead of hanging. Its time limits, and
pytest-timeout's, allow for a loaded machine (:mod:`zero_testkit.timeouts`).
:mod:`zero_testkit.devices` says which devices a test can use here (cpu always,
cuda when present) and skips with the reason otherwise; the pytest plugin
(:mod:`zero_testkit.pytest_plugin`) provides the ``device`` fixture.
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
from zero_testkit.timeouts import max_scale, scaled, timeout_scale

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
    "max_scale",
    "requires_gpus",
    "run_distributed",
    "scaled",
    "timeout_scale",
]
