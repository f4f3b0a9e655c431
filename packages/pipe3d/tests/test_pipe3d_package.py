"""The package installs alone and imports."""

from __future__ import annotations

import pipe3d


def test_version_is_set() -> None:
    assert pipe3d.__version__ == "0.1.0"
