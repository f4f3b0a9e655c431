"""The agent's stop signals: the first one stops the node, any later one is ignored.

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

import os
import signal
import threading
from types import FrameType

__all__ = ["DEFAULT_SIGNALS", "StopState", "stop_signals"]

# What torch's PContext.start() handles when TORCHELASTIC_SIGNALS_TO_HANDLE is unset.
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


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

    def install(self) -> None:
        """Handle every stop signal here instead of in torch's handler (main thread only)."""
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
        if self.signal is None:
            return
        from torch.distributed.elastic.multiprocessing.api import SignalException

        raise SignalException(f"Process {os.getpid()} got signal: {self.signal}", sigval=self.signal)
