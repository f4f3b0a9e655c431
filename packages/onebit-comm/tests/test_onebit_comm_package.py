"""The package installs alone and imports."""

from __future__ import annotations

import onebit_comm


def test_version_is_set() -> None:
    assert onebit_comm.__version__ == "0.1.0"
