"""Bind one worker to its share of the cores, then exec the real worker command.

Used by ``--bind_cores_to_rank``: ``python -m ds_launch._bind LOCAL_RANK NPROC CORE_LIST -- cmd...``.
The cores (``CORE_LIST`` like ``0-3,8``, or every core this process may use) are split
into NPROC contiguous equal blocks; rank i gets block i, and ``OMP_NUM_THREADS`` is set to
the block size unless already set, as DeepSpeed does.
"""

from __future__ import annotations

import os
import sys

__all__ = ["cores_for_rank", "parse_core_list"]


def parse_core_list(text: str) -> list[int]:
    """``"1,3-5,7"`` -> ``[1, 3, 4, 5, 7]``; an error names the bad item."""
    cores: list[int] = []
    for item in text.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--bind_core_list: bad item {item!r}; expected numbers and ranges like 1,3-5,7")
        cores += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return cores


def cores_for_rank(local_rank: int, nproc: int, cores: list[int]) -> list[int]:
    """Rank ``local_rank``'s block of ``cores`` (at least one core each)."""
    if len(cores) < nproc:
        raise ValueError(f"--bind_cores_to_rank: {nproc} workers but only {len(cores)} core(s) {cores}")
    per = len(cores) // nproc
    return cores[local_rank * per : (local_rank + 1) * per]


def main(argv: list[str]) -> None:
    """Apply the binding and exec the command after ``--``."""
    local_rank, nproc, core_text, sep, *cmd = argv
    if sep != "--" or not cmd:
        raise SystemExit("usage: python -m ds_launch._bind LOCAL_RANK NPROC CORE_LIST -- cmd...")
    cores = parse_core_list(core_text) if core_text else sorted(os.sched_getaffinity(0))
    mine = cores_for_rank(int(local_rank), int(nproc), cores)
    os.sched_setaffinity(0, mine)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(mine)))
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
