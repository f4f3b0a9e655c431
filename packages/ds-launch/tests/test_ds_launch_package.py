"""The package installs alone and imports."""

from __future__ import annotations

import ds_launch


def test_version_is_set() -> None:
    assert ds_launch.__version__ == "0.1.0"


def test_import_prints_no_numpy_warning() -> None:
    """torch warns "Failed to initialize NumPy" at import when numpy is missing: it is a dependency."""
    import subprocess
    import sys

    code = "import torch, ds_launch; torch.zeros(1).numpy()"
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NumPy" not in done.stderr, done.stderr
