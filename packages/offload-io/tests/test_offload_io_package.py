"""The package installs alone and imports."""

from __future__ import annotations

import offload_io


def test_version_is_set() -> None:
    assert offload_io.__version__ == "0.1.0"


def test_native_library_is_present_and_compatible() -> None:
    from offload_io._native import ds_native

    assert ds_native.build_info()["abi_version"] == 1


def test_missing_native_library_says_what_to_install(monkeypatch) -> None:
    import importlib
    import sys

    import pytest

    monkeypatch.setitem(sys.modules, "ds_native", None)  # as if ds-native were not installed
    monkeypatch.delitem(sys.modules, "offload_io._native")
    with pytest.raises(ImportError, match=r"needs the ds-native package.*uv pip install \./native"):
        importlib.import_module("offload_io._native")


def test_import_prints_no_numpy_warning() -> None:
    """torch warns "Failed to initialize NumPy" at import when numpy is missing: it is a dependency."""
    import subprocess
    import sys

    code = "import torch, offload_io; torch.zeros(1).numpy()"
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NumPy" not in done.stderr, done.stderr
