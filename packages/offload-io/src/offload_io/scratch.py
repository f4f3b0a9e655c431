"""Per-run scratch directories for NVMe swap files: removed at exit, and after a crash at the next start.

A swap file is not a checkpoint: it holds optimizer state (or parameters) in the middle of training, valid
only for the process that wrote it. Each process that swaps gets its own directory
``<nvme_path>/zero-all-swap/<kind>-<host>-pid<pid>-<random>/`` holding a ``lock`` file that the process keeps
locked (``fcntl.flock``) for its lifetime and that records its pid. The directory is removed at interpreter
exit (``atexit``) or when :meth:`ScratchDir.cleanup` is called. A process killed hard leaves its directory
behind with an unlocked lock file; the next :class:`ScratchDir` created under the same ``nvme_path`` finds
it (the lock can be taken: its owner is gone) and removes it. The lock, not the pid, decides: pids are
reused, and a directory on a shared file system may belong to a live process on another host.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import socket
import time
import uuid
import weakref
from pathlib import Path

__all__ = ["ROOT_NAME", "ScratchDir", "remove_stale"]

ROOT_NAME = "zero-all-swap"
_LOCK = "lock"
_ABANDONED_S = 3600.0  # a hidden half-made run directory older than this is a crash's leftover


def remove_stale(root: Path) -> list[Path]:
    """Remove every run directory under ``root`` whose owner no longer holds its lock; returns them."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in sorted(root.iterdir()):
        lock = d / _LOCK
        if not d.is_dir():
            continue
        if d.name.startswith("."):
            # Being created (see ScratchDir): only a creation abandoned long ago is stale.
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime > _ABANDONED_S:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue  # no lock file: its owner is removing it right now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner is alive
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


class ScratchDir:
    """This process's swap directory under ``nvme_path`` (see the module docstring)."""

    def __init__(self, nvme_path: str | os.PathLike[str], kind: str = "swap") -> None:
        base = Path(nvme_path)
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"nvme_path {base}: cannot create the swap directory: {e.strerror}") from e
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(f"nvme_path {base}: not writable by this process (NVMe offload writes swap files)")
        self.root = base / ROOT_NAME
        self.root.mkdir(exist_ok=True)
        self.removed_stale = remove_stale(self.root)
        name = f"{kind}-{socket.gethostname()}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Made under a hidden name, locked, then renamed: a concurrent stale-directory sweep (another rank
        # starting) never sees a run directory whose lock is not yet held.
        making = self.root / f".{name}"
        making.mkdir()
        self._lock_fd = os.open(making / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        self.path = self.root / name
        os.rename(making, self.path)
        # Removed at exit even when the owner forgets; finalize also runs if the object is collected first.
        self._finalizer = weakref.finalize(self, _cleanup, self.path, self._lock_fd, os.getpid())
        atexit.register(self._finalizer)

    def file(self, name: str) -> Path:
        """The path of swap file ``name`` inside this run's directory."""
        return self.path / name

    def cleanup(self) -> None:
        """Remove the directory and its files now (idempotent)."""
        self._finalizer()

    @property
    def alive(self) -> bool:
        """False after :meth:`cleanup`."""
        return self._finalizer.alive


def _cleanup(path: Path, fd: int, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child inherited the object: the directory is its parent's
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(fd)
