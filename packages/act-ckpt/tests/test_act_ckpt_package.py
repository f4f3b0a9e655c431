"""The package installs alone and imports."""

from __future__ import annotations

import act_ckpt


def test_version_is_set() -> None:
    assert act_ckpt.__version__ == "0.1.0"
