"""Which devices a test can run on, and pytest marks that say so (with the reason when it cannot).

Every test that can run on CUDA is written once and parametrized over devices: ``cpu`` always, ``cuda``
when torch sees a CUDA device, otherwise collected and skipped with the reason (a CPU-only torch build,
or no device visible). The same goes for tests that need a ds-native built with its CUDA extension, and
for multi-GPU tests (NCCL across ranks) that need at least N devices.

Use the ``device`` fixture (registered by :mod:`zero_testkit.pytest_plugin`), or the marks directly::

    from zero_testkit import cuda_only, device_params, requires_gpus

    @pytest.mark.parametrize("device", device_params())
    def test_x(device): ...

    @cuda_only
    def test_cuda_rng(): ...

    @requires_gpus(2)
    def test_nccl(): ...

Every mark here also carries ``pytest.mark.cuda``, so ``pytest -m cuda`` selects exactly the tests that
need a GPU (what ``tools/gpu_check.py`` runs) and ``-m "not cuda"`` the CPU ones.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import pytest
import torch

__all__ = [
    "cuda_marks",
    "cuda_only",
    "cuda_skip_reason",
    "device_params",
    "ds_native_cuda_only",
    "ds_native_cuda_skip_reason",
    "gpu_count",
    "requires_gpus",
]

_F = TypeVar("_F", bound=Callable[..., Any])


@cache
def cuda_skip_reason() -> str | None:
    """None when torch can run on a CUDA device here; otherwise why not, in one line."""
    if torch.version.cuda is None:
        return f"needs a CUDA device: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"needs a CUDA device: none visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    return None


def gpu_count() -> int:
    """CUDA devices torch can use (0 on a CPU-only build)."""
    return torch.cuda.device_count() if cuda_skip_reason() is None else 0


@cache
def ds_native_cuda_skip_reason() -> str | None:
    """None when ds-native's CUDA kernels can run here; otherwise why not (device, or build)."""
    reason = cuda_skip_reason()
    if reason is not None:
        return reason
    try:
        import ds_native
    except ImportError as exc:
        return f"needs ds-native: {exc}"
    if not ds_native.build_info()["cuda"]:
        return (
            "needs ds-native's CUDA extension: it was built without one (no nvcc at build time, or DS_NATIVE_CUDA=OFF)"
        )
    return None


def cuda_marks() -> list[pytest.MarkDecorator]:
    """``[pytest.mark.cuda, skipif(no CUDA)]``: for ``pytestmark = cuda_marks()`` in a CUDA-only module."""
    reason = cuda_skip_reason()
    return [pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=reason or "")]


def _apply(obj: _F, marks: list[pytest.MarkDecorator]) -> _F:
    for mark in marks:
        obj = mark(obj)
    return obj


def cuda_only(obj: _F) -> _F:
    """Decorator: this test needs a CUDA device (marked ``cuda``; skipped with the reason without one)."""
    return _apply(obj, cuda_marks())


def ds_native_cuda_only(obj: _F) -> _F:
    """Decorator: this test runs ds-native's CUDA kernels (device and CUDA extension needed)."""
    reason = ds_native_cuda_skip_reason()
    return _apply(obj, [pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=reason or "")])


def requires_gpus(n: int) -> Callable[[_F], _F]:
    """Decorator: this test needs at least ``n`` CUDA devices (e.g. NCCL across ``n`` ranks)."""

    def mark(obj: _F) -> _F:
        have = gpu_count()
        reason = cuda_skip_reason() or f"needs {n} CUDA devices, {have} visible"
        return _apply(obj, [pytest.mark.cuda, pytest.mark.skipif(have < n, reason=reason)])

    return mark


def device_params(*, cpu: bool = True, ds_native_cuda: bool = False) -> list[Any]:
    """``pytest.param`` values ``"cpu"`` and ``"cuda"`` (the latter marked ``cuda``, skipped with the reason).

    ``ds_native_cuda=True``: the cuda variant also needs ds-native's CUDA extension.
    """
    reason = ds_native_cuda_skip_reason() if ds_native_cuda else cuda_skip_reason()
    cuda = pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=reason or "")]
    )
    return [pytest.param("cpu", id="cpu"), cuda] if cpu else [cuda]
