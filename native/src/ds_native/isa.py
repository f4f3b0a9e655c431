"""Choose which compiled CPU instruction set the kernels use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ds_native import _ds_native_cpu


def detected_isa() -> str:
    """Best compiled ISA this CPU supports: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    return _ds_native_cpu.isa_detected()


def active_isa() -> str:
    """ISA the kernels run with now (``DS_NATIVE_ISA`` or ``set_isa`` override, else detected)."""
    return _ds_native_cpu.isa_active()


def set_isa(name: str) -> None:
    """Force ``"scalar"``, ``"avx2"`` or ``"avx512"`` for every kernel; ``"auto"`` restores detection.

    Raises ValueError if the ISA was not compiled or this CPU lacks it.
    """
    _ds_native_cpu.set_isa(name)


@contextmanager
def forced_isa(name: str) -> Iterator[None]:
    """Run the block with ``name`` forced, then return to automatic selection."""
    set_isa(name)
    try:
        yield
    finally:
        set_isa("auto")
