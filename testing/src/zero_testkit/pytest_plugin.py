"""pytest plugin (registered by zero-testkit's ``pytest11`` entry point): scale pytest-timeout limits.

Every ``@pytest.mark.timeout(N)`` and the ``timeout`` ini/command-line value become
``N * max_scale()`` (see :mod:`zero_testkit.timeouts`): pytest-timeout is the last resort, and
must not fire before :func:`zero_testkit.run_distributed`'s own, load-scaled deadline, which
reports every rank's stack. Without pytest-timeout installed this plugin does nothing.
"""

from __future__ import annotations

import pytest

from zero_testkit.timeouts import max_scale


def _scale() -> float:
    return max_scale()


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Scale the session-wide limit (after pytest-timeout has read it)."""
    base = getattr(config, "_env_timeout", None)
    if isinstance(base, (int, float)) and base > 0:
        config._env_timeout = base * _scale()  # type: ignore[attr-defined]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Replace each test's closest timeout marker by a scaled copy."""
    scale = _scale()
    if scale == 1.0:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            continue
        kwargs = dict(marker.kwargs)
        args = list(marker.args)
        timeout = kwargs.pop("timeout", args[0] if args else None)
        if len(args) > 1:
            kwargs.setdefault("method", args[1])
        if isinstance(timeout, (int, float)) and timeout > 0:
            item.add_marker(pytest.mark.timeout(timeout=timeout * scale, **kwargs), append=False)
