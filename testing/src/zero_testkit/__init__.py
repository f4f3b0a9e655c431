"""Test helpers shared by every zero-all package (not shipped to users).

``run_distributed(fn, world_size)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` real processes joined by a gloo process group, and fails with
every rank's traceback instead of hanging.
"""

from zero_testkit.distributed import DistributedTestError, free_port, run_distributed

__all__ = ["DistributedTestError", "free_port", "run_distributed"]
