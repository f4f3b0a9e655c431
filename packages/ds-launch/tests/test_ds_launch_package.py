"""The package installs alone and imports."""

from __future__ import annotations

import ds_launch


def test_version_is_set() -> None:
    assert ds_launch.__version__ == "0.1.0"
