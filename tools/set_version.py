"""Set the one zero-all version everywhere: `python tools/set_version.py 0.2.0`.

VERSION is the single source; this rewrites each package's version, its pins
on siblings, and the ``__version__`` strings. integration_tests/test_versions.py
fails if anything disagrees.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = "ds-native|amp-scaler|act-ckpt|offload-io|zero-shard|onebit-comm|pipe3d|ds-launch|ds-monitor|zero-all"


def main(version: str) -> None:
    (ROOT / "VERSION").write_text(version + "\n")
    for pyproject in [
        ROOT / "native/pyproject.toml",
        ROOT / "testing/pyproject.toml",
        *ROOT.glob("packages/*/pyproject.toml"),
    ]:
        text = pyproject.read_text()
        text = re.sub(r'(?m)^version = "[^"]+"', f'version = "{version}"', text)
        text = re.sub(rf'"((?:{NAMES})(?:\[[a-z,]+\])?)==[^"]+"', rf'"\1=={version}"', text)
        pyproject.write_text(text)
    for init in [*ROOT.glob("packages/*/src/*/__init__.py"), ROOT / "native/src/ds_native/_build.py"]:
        text = init.read_text()
        init.write_text(re.sub(r'(?m)^__version__ = "[^"]+"', f'__version__ = "{version}"', text))


if __name__ == "__main__":
    main(sys.argv[1])
