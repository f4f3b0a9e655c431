"""The package installs alone and imports."""

from __future__ import annotations

import amp_scaler


def test_version_is_set() -> None:
    assert amp_scaler.__version__ == "0.1.0"
