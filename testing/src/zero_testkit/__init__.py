"""Test helpers shared by every zero-all package (not shipped to users).

``run_distributed(fn, world_size)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` real processes joined by a gloo process group, and fails with
every rank's traceback instead of hanging. Its time limits, and pytest-timeout's,
allow for a loaded machine (:mod:`zero_testkit.timeouts`).
"""

from zero_testkit.distributed import DistributedTestError, free_port, run_distributed
from zero_testkit.timeouts import max_scale, scaled, timeout_scale

__all__ = ["DistributedTestError", "free_port", "max_scale", "run_distributed", "scaled", "timeout_scale"]
