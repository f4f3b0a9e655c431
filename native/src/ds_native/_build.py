"""What was compiled, and whether it suits the package importing it."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from importlib import resources
from typing import Any

from ds_native import _ds_native_cpu

__version__ = "0.1.0"
# Bumped whenever a binding's signature or semantics change incompatibly;
# dependents state the ABI they were written against.
ABI_VERSION = 1


@cache
def _compiled_facts() -> dict[str, str]:
    text = resources.files("ds_native").joinpath("build_config.json").read_text()
    return json.loads(text)


def cuda_compiled() -> bool:
    """True when the CUDA extension module was built into this wheel."""
    return importlib.util.find_spec("ds_native._ds_native_cuda") is not None


def build_info() -> dict[str, Any]:
    """Report what this build contains and what this machine will run.

    Keys: ``version``, ``abi_version``, ``cpu_isa_variants`` (compiled),
    ``cpu_isa_detected`` (best this CPU supports), ``cpu_isa_active`` (what
    kernels use now), ``cuda`` (extension compiled), ``cuda_archs``,
    ``cuda_compiler_version``, ``cxx_compiler``, ``openmp``, ``io_backends`` (the async IO
    backends compiled in), ``io_backends_usable`` (those this machine allows now, probed) and
    ``io_backends_unusable`` (backend: reason, for compiled ones the probe refused).
    """
    from ds_native import aio

    facts = _compiled_facts()
    cuda = cuda_compiled()
    return {
        "version": __version__,
        "abi_version": ABI_VERSION,
        "cpu_isa_variants": facts["cpu_isa_variants"].split(","),
        "cpu_isa_detected": _ds_native_cpu.isa_detected(),
        "cpu_isa_active": _ds_native_cpu.isa_active(),
        "cuda": cuda,
        "cuda_archs": facts["cuda_archs"].split(";") if cuda else [],
        "cuda_compiler_version": facts["cuda_compiler_version"] if cuda else None,
        "cxx_compiler": facts["cxx_compiler"],
        "openmp": facts["openmp"],
        "io_backends": facts["io_backends"].split(","),
        "io_backends_usable": aio.backends(),
        "io_backends_unusable": {
            b["name"]: b["reason"] for b in aio.backend_report() if b["compiled"] and not b["usable"]
        },
    }


def check_compatible(package: str, abi_version: int) -> None:
    """Raise ImportError unless this ds-native provides ``abi_version``.

    Dependents call this at import time so a stale build fails with a message
    that says what to install rather than with a missing symbol later.
    """
    if abi_version != ABI_VERSION:
        raise ImportError(
            f"{package} needs ds-native ABI {abi_version}, but the installed ds-native "
            f"{__version__} provides ABI {ABI_VERSION}. Reinstall both from the same "
            "zero-all checkout: `uv pip install ./native ./packages/<name>`."
        )
