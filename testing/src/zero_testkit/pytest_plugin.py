"""pytest plugin (registered by zero-testkit's ``pytest11`` entry point, or ``-p zero_testkit.pytest_plugin``).

Time limits: every ``@pytest.mark.timeout(N)`` and the ``timeout`` ini/command-line value become
``N * max_scale()`` (see :mod:`zero_testkit.timeouts`): pytest-timeout is the last resort, and
must not fire before :func:`zero_testkit.run_distributed`'s own, load-scaled deadline, which
reports every rank's stack. Without pytest-timeout installed this part does nothing.

Devices (see :mod:`zero_testkit.devices`):

- ``device`` fixture: a ``torch.device``, parametrized ``cpu`` and ``cuda`` (the cuda case skipped with
  the reason on a machine without one);
- the ``cuda`` and ``multi_gpu`` markers are registered, so ``--strict-markers`` runs accept them anywhere;
- ``DS_ACCELERATOR`` defaults to ``cpu`` for the test run: a test that is not parametrized over devices
  was written for the CPU, and zero-all's ``get_device()`` would otherwise move its model to a GPU the
  test's data never reaches. Tests that run on CUDA say so (``device`` fixture, ``run_distributed(env=...)``).
  An explicit ``DS_ACCELERATOR`` in the environment is left as it is.
"""

from __future__ import annotations

import os

import pytest
import torch

from zero_testkit.devices import cuda_skip_reason, device_params
from zero_testkit.timeouts import max_scale


def _scale() -> float:
    return max_scale()


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Scale the session-wide limit (after pytest-timeout has read it); register the device markers; pin
    untagged tests to the CPU (see the module docstring)."""
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "multi_gpu: needs two or more CUDA devices")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    base = getattr(config, "_env_timeout", None)
    if isinstance(base, (int, float)) and base > 0:
        config._env_timeout = base * _scale()  # type: ignore[attr-defined]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Replace each test's closest timeout marker by a scaled copy."""
    scale = _scale()
    if scale == 1.0:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            continue
        kwargs = dict(marker.kwargs)
        args = list(marker.args)
        timeout = kwargs.pop("timeout", args[0] if args else None)
        if len(args) > 1:
            kwargs.setdefault("method", args[1])
        if isinstance(timeout, (int, float)) and timeout > 0:
            item.add_marker(pytest.mark.timeout(timeout=timeout * scale, **kwargs), append=False)


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
