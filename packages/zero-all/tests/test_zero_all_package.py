"""The package installs alone and imports."""

from __future__ import annotations

import zero_all


def test_version_is_set() -> None:
    assert zero_all.__version__ == "0.1.0"
