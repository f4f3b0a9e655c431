"""``ds-launch`` whose stop signal arrives while its agent polls the rendezvous store.

usage: signal_in_store_poll.py TRIGGER_FILE raise|swallow LAUNCHER_ARGS...

Once TRIGGER_FILE exists, the agent's next poll of the cross-node abort key SIGTERMs this
process from inside the store call, so the signal handler's ``SignalException`` is raised
within the poll: the race behind the intermittent "rank 0 survived" in test_two_hosts.py
(EOF on the ssh stdin at any moment, SIGTERM, handler runs wherever the main thread is), made
deterministic. With ``swallow`` the call also swallows the exception, as any library code
with ``except Exception`` might: the agent must still stop.
"""

import os
import signal
import sys
import time

import torch.distributed as dist

from ds_launch import agent, cli

trigger, mode, *launcher_args = sys.argv[1:]
_original_check = dist.PrefixStore.check
_fired = False


def check(self, keys):
    global _fired
    if not _fired and keys == [agent._ABORT_KEY] and os.path.exists(trigger):
        _fired = True
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside the poll
            time.sleep(1)
        except Exception:
            if mode != "swallow":
                raise
    return _original_check(self, keys)


dist.PrefixStore.check = check
sys.exit(cli.main(launcher_args))
