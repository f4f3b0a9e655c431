"""zero-testkit's pytest plugin (loaded through the ``pytest11`` entry point, or ``-p zero_testkit.plugin``).

- ``device`` fixture: a ``torch.device``, parametrized ``cpu`` and ``cuda`` (the cuda case skipped with the
  reason on a machine without one; see :mod:`zero_testkit.devices`).
- the ``cuda`` and ``multi_gpu`` markers are registered, so ``--strict-markers`` runs accept them anywhere.
- ``DS_ACCELERATOR`` defaults to ``cpu`` for the test run: a test that is not parametrized over devices was
  written for the CPU, and zero-all's ``get_device()`` would otherwise move its model to a GPU the test's
  data never reaches. Tests that run on CUDA say so (``device`` fixture, ``run_distributed(env=...)``).
  An explicit ``DS_ACCELERATOR`` in the environment is left as it is.
"""

from __future__ import annotations

import os

import pytest
import torch

from zero_testkit.devices import cuda_skip_reason, device_params


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers; pin untagged tests to the CPU (see the module docstring)."""
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "multi_gpu: needs two or more CUDA devices")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_report_header(config: pytest.Config) -> str:
    """One header line: what the cuda-parametrized tests will do on this machine."""
    reason = cuda_skip_reason()
    if reason is None:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"zero-testkit: CUDA tests run on {torch.cuda.device_count()} device(s): {names}"
    return f"zero-testkit: CUDA tests skip ({reason})"


@pytest.fixture(params=device_params())
def device(request: pytest.FixtureRequest) -> torch.device:
    """``torch.device("cpu")``, then ``torch.device("cuda")`` (skipped without CUDA)."""
    return torch.device(request.param)
