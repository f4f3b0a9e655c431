"""Test time limits that allow for a loaded machine without hiding real hangs.

A limit is written for an idle machine (``timeout=60``). CI and developer machines are often
shared: on 2 cores at load average 5 every test runs ~2.5x slower, and a fixed limit then
fails a healthy test. So each limit is multiplied by a *scale*:

- ``ZERO_TESTKIT_TIMEOUT_SCALE=F`` in the environment: exactly ``F`` (e.g. 3 on a slow
  runner, 1 to disable the automatic scale);
- otherwise the machine's load per core (1-minute load average / CPU count), at least 1 and
  at most :data:`MAX_AUTO_SCALE`. :func:`zero_testkit.run_distributed` re-reads it while it
  waits, so load that arrives during a test extends that test's deadline too.

A real hang still fails: at most ``MAX_AUTO_SCALE`` times the written limit, with every
rank's stack. pytest-timeout limits (``@pytest.mark.timeout``, the ``timeout`` ini value) are
multiplied by the largest scale the helper may use (see :mod:`zero_testkit.pytest_plugin`),
so the helper's own deadline, the one that reports stacks, always comes first.
"""

from __future__ import annotations

import os

__all__ = ["ENV", "MAX_AUTO_SCALE", "max_scale", "scaled", "timeout_scale"]

ENV = "ZERO_TESTKIT_TIMEOUT_SCALE"
MAX_AUTO_SCALE = 4.0


def _explicit() -> float | None:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{ENV}={raw!r}: expected a positive number (a multiplier for test time limits)")
    return value


def timeout_scale() -> float:
    """The multiplier for time limits now: the environment's, or the load per core in [1, MAX_AUTO_SCALE]."""
    explicit = _explicit()
    if explicit is not None:
        return explicit
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 1.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_AUTO_SCALE, max(1.0, load / max(1, cores)))


def max_scale() -> float:
    """The largest multiplier :func:`timeout_scale` can return (the environment's, or MAX_AUTO_SCALE)."""
    explicit = _explicit()
    return explicit if explicit is not None else MAX_AUTO_SCALE


def scaled(seconds: float) -> float:
    """``seconds`` times the current :func:`timeout_scale` (for subprocess and wait limits in tests)."""
    return seconds * timeout_scale()
