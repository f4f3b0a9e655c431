"""The package installs alone and imports."""

from __future__ import annotations

import zero_shard


def test_version_is_set() -> None:
    assert zero_shard.__version__ == "0.1.0"


def test_native_library_is_present_and_compatible() -> None:
    from zero_shard._native import ds_native

    assert ds_native.build_info()["abi_version"] == 1


def test_missing_native_library_says_what_to_install(monkeypatch) -> None:
    import importlib
    import sys

    import pytest

    monkeypatch.setitem(sys.modules, "ds_native", None)  # as if ds-native were not installed
    monkeypatch.delitem(sys.modules, "zero_shard._native")
    with pytest.raises(ImportError, match=r"needs the ds-native package.*uv pip install \./native"):
        importlib.import_module("zero_shard._native")
