"""Fixtures for the ds-launch tests (helpers live in _dsl_helpers.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def launcher_env() -> dict[str, str]:
    """The environment for a launcher subprocess: no stray env file, one thread per rank."""
    env = dict(os.environ)
    env.pop("DS_ENV_FILE", None)
    env["OMP_NUM_THREADS"] = "1"
    return env
