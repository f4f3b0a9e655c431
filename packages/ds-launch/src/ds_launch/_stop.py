"""How an agent stops: the first stop signal stops the node, any later one is ignored; over
ssh, EOF on stdin is such a signal, backed by a watchdog ([Note: stdin watchdog]).

[Note: one-shot stop] torch's elastic agent turns a signal into a ``SignalException``
raised in the main thread wherever it happens to be, and its ``SimpleElasticAgent.run``
answers it by stopping the workers (SIGTERM, wait, SIGKILL). Two things went wrong with that
in a real multi-node stop (ds-launch closes each ssh stdin; each agent SIGTERMs itself):

1. The exception is raised *inside* whatever the main thread is running. The monitor loop
   polls the rendezvous store for the cross-node abort key under ``except Exception`` (a
   store error means node 0 is gone), and ``SignalException`` is an ``Exception``: a signal
   that arrived during that poll was counted as a store error and dropped, the agent kept
   monitoring, and its workers outlived the job (the intermittent "rank 0 survived").
2. Every further signal (SIGHUP, a second SIGTERM or Ctrl-C) raises again, in the middle of
   the teardown, cutting the workers' grace period short or skipping the final SIGKILL of
   their process groups.

So the agent handles the stop signals itself (:meth:`StopState.install`, again after each
``PContext.start()``, which re-registers torch's handler): the first signal records itself,
marks the node as stopping and raises torch's ``SignalException`` (so torch's own shutdown
path runs); while stopping, signals are ignored, since the teardown is bounded by
``--term_timeout`` anyway. :meth:`StopState.raise_pending` re-raises a recorded signal at
the points where the agent loops (monitor, exit barrier), so a ``SignalException`` that some
code swallows still stops the node at the next monitor interval.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType

__all__ = ["DEFAULT_SIGNALS", "StopState", "kill_process_groups", "stop_signals", "watch_stdin", "write_stderr"]

# What torch's PContext.start() handles when TORCHELASTIC_SIGNALS_TO_HANDLE is unset.
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
# How much longer than its own bounded teardown (SIGTERM grace + torch's wait after SIGKILL,
# term_timeout each, + the output pump's final drain) an agent that lost its launcher may
# take before the stdin watchdog ends it.
WATCHDOG_SLACK = 10.0


def stop_signals() -> list[signal.Signals]:
    """The signals torch's elastic agent turns into ``SignalException``, read the way it reads
    ``TORCHELASTIC_SIGNALS_TO_HANDLE`` (unknown names are skipped, as torch skips them)."""
    found = []
    for name in os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", DEFAULT_SIGNALS).split(","):
        sig = getattr(signal, name.strip(), None)
        if isinstance(sig, signal.Signals) and sig not in found:
            found.append(sig)
    return found


class StopState:
    """Whether this node is stopping, and the signal that stopped it (see [Note: one-shot stop])."""

    def __init__(self) -> None:
        # Set once the node stops its workers on purpose: a signal, a failure, an abort, or the
        # teardown after the workers ended. EOF on stdin and further signals are then ignored.
        self.stopping = threading.Event()
        self.signal: signal.Signals | None = None  # the first stop signal, if one stopped us
        self._exception: type[Exception] | None = None  # torch's SignalException, once installed

    def install(self) -> None:
        """Handle every stop signal here instead of in torch's handler (main thread only)."""
        # Imported here, not in the handler: a handler should not import (torch is loaded by now).
        from torch.distributed.elastic.multiprocessing.api import SignalException

        self._exception = SignalException
        for sig in stop_signals():
            signal.signal(sig, self._handle)

    def begin(self) -> None:
        """The node is stopping (failure, abort, teardown): from now on ignore stop signals."""
        self.stopping.set()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping.is_set():
            return  # a stop is under way and bounded by term_timeout: let it finish
        self.signal = signal.Signals(signum)
        self.stopping.set()
        self.raise_pending()

    def raise_pending(self) -> None:
        """Raise torch's ``SignalException`` for the recorded stop signal, if there is one.

        Called where the agent loops: if the exception the handler raised was swallowed on
        its way up, the loop is still running and this raises it again.
        """
        if self.signal is None or self._exception is None:
            return
        raise self._exception(f"Process {os.getpid()} got signal: {self.signal}", sigval=self.signal)


def write_stderr(text: str) -> None:
    """Write to stderr; a closed stderr is not an error here.

    Over ssh our stderr is a pipe that the launcher may already have closed (it SIGKILLs the
    ssh client term_timeout + 5 s after a stop): a message that cannot be delivered must not
    abort the teardown with a BrokenPipeError.
    """
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()


def kill_process_groups(pgids: list[int]) -> None:
    """SIGKILL each process group (a worker and whatever it started); ones already gone are skipped."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def watch_stdin(state: StopState, worker_groups: list[int], term_timeout: float) -> None:
    """Treat EOF on stdin as "the launcher is gone" (the ssh runner): stop this node.

    On EOF the agent SIGTERMs itself, so the elastic agent's signal path stops the workers,
    whatever state it is in (unless it is already stopping for a failure or an abort).

    [Note: stdin watchdog] A Python signal handler only runs when the main thread is back in
    the interpreter, and a C++ call can hold it for long: node 0's rendezvous store waits up
    to rdzv_timeout (600 s) for the other nodes in one call, so an agent whose launcher found
    a host unreachable could not be stopped by its SIGTERM. Nobody is left to wait for this
    node's result: if the agent is still running well after its own bounded teardown would
    have ended, SIGKILL ``worker_groups`` (the workers' process group ids) and exit from here.
    """

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if not state.stopping.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2 * term_timeout + WATCHDOG_SLACK)
        kill_process_groups(list(worker_groups))
        write_stderr("ds-launch: the agent did not stop after its launcher went away; killed its workers\n")
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="ds-launch-stdin", daemon=True).start()
