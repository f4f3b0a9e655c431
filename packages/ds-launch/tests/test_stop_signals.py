"""The agent's stop signals ([Note: one-shot stop] in ds_launch/_stop.py): the first signal stops
the node, a signal swallowed on its way up still stops it, further signals cannot cut the
teardown short, and an agent whose main thread cannot take a signal at all is ended by its
stdin watchdog. The unit tests use SIGUSR1/SIGUSR2 so pytest's own handlers stay untouched."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
from _dsl_helpers import LAUNCHER, WORKER, alive, free_port, read_reports
from torch.distributed.elastic.multiprocessing.api import SignalException

from ds_launch._stop import StopState, stop_signals
from ds_launch.agent import encode_world_info
from zero_testkit import scaled

pytestmark = pytest.mark.timeout(150)

SHIM = Path(__file__).parent / "scripts" / "signal_in_store_poll.py"


@pytest.fixture
def user_signals(monkeypatch: pytest.MonkeyPatch):
    """Make SIGUSR1/SIGUSR2 the stop signals for the test; restore their handlers afterwards."""
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGUSR1, SIGUSR2")
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_stop_signals_read_like_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_SIGNALS_TO_HANDLE", raising=False)
    assert stop_signals() == [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", " SIGTERM,NOT_A_SIGNAL,SIGTERM,SIGUSR1")
    assert stop_signals() == [signal.SIGTERM, signal.SIGUSR1]


def test_first_signal_raises_later_ones_are_ignored(user_signals: None) -> None:
    stop = StopState()
    stop.install()
    with pytest.raises(SignalException) as info:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)  # the handler interrupts this at once
    assert info.value.sigval == signal.SIGUSR1 and stop.stopping.is_set()
    # The teardown is under way: a second signal of either kind must not raise again.
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert stop.signal == signal.SIGUSR1
    # Where the agent loops, the recorded signal is raised again (in case it was swallowed).
    with pytest.raises(SignalException) as again:
        stop.raise_pending()
    assert again.value.sigval == signal.SIGUSR1


def test_signal_after_a_failure_began_the_stop_is_ignored(user_signals: None) -> None:
    stop = StopState()
    stop.install()
    stop.begin()  # a worker failed: the agent is stopping the others and reporting
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert stop.signal is None
    stop.raise_pending()  # nothing recorded: no exception


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    running = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
    errs = [p.communicate()[1] for p in procs]
    assert not running, f"node(s) {running} still running {timeout:.0f} s after the stop signal:\n" + "\n".join(errs)
    return errs


@pytest.mark.parametrize("mode", ["raise", "swallow"])
def test_signal_during_store_poll_stops_the_node(tmp_path: Path, launcher_env: dict[str, str], mode: str) -> None:
    # Two --no_ssh "nodes" on this machine, so each agent polls the store for the abort key.
    # Node 0's SIGTERM arrives inside that poll (deterministically, see the shim); before the
    # fix the poll's `except Exception` took it for a store error and node 0 ran on forever.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out, trigger = tmp_path / "out", tmp_path / "trigger"
    out.mkdir()
    port = str(free_port())
    procs = []
    for node, prefix in ((0, [sys.executable, str(SHIM), str(trigger), mode]), (1, LAUNCHER)):
        args = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_port", port]
        args += ["--term_timeout", "2", str(WORKER), str(out), "--hang", "--spawn-child"]
        procs.append(subprocess.Popen([*prefix, *args], env=launcher_env, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + scaled(90)
        while len(read_reports(out)) < 2:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        trigger.touch()
        errs = _wait_all(procs, scaled(40))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 128 + signal.SIGTERM, errs[0]
    assert "ds-launch: SIGTERM received on host localhost; workers stopped" in errs[0]
    assert procs[1].returncode == 143, errs[1]  # node 0's store went away: the job is over
    for r in read_reports(out).values():
        assert not alive(r["pid"]) and not alive(r["child_pid"]), f"rank {r['rank']} survived"


def test_second_signal_does_not_cut_the_teardown_short(tmp_path: Path, launcher_env: dict[str, str]) -> None:
    # Each rank takes 3 s to exit after SIGTERM (one after the other, if one is blocked in the
    # barrier with the other); --term_timeout 20 grants that on a loaded machine. SIGTERM, SIGHUP
    # and SIGINT sent while the agent waits for them must neither shorten the grace period
    # (torch's handler raised again inside that wait, straight to the SIGKILL) nor change the
    # exit status or message of the first signal.
    args = ["--num_gpus", "2", "--master_port", str(free_port()), "--term_timeout", "20"]
    args += [str(WORKER), str(tmp_path), "--hang", "--spawn-child", "--term-delay", "3"]
    proc = subprocess.Popen(
        [*LAUNCHER, *args], env=launcher_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + scaled(90)
        while len(read_reports(tmp_path)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + scaled(20)
        while not all((tmp_path / f"term_rank{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "the workers never got SIGTERM"
            time.sleep(0.05)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # during the teardown
            proc.send_signal(sig)
            time.sleep(0.3)
        _, err = proc.communicate(timeout=scaled(30))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "ds-launch: SIGTERM received on host localhost; workers stopped" in err
    for r in read_reports(tmp_path).values():
        assert (tmp_path / f"term_done_rank{r['rank']}").exists(), f"rank {r['rank']} lost its grace period\n{err}"
        assert not alive(r["pid"]) and not alive(r["child_pid"]), f"rank {r['rank']} survived"


def _listening(port: int) -> bool:
    """True if some socket on this machine listens on TCP ``port`` (read from /proc, no connect:
    a connection would count as a node joining the rendezvous store)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def test_stdin_watchdog_stops_an_agent_stuck_in_the_rendezvous(tmp_path: Path, launcher_env: dict[str, str]) -> None:
    # What the ssh runner leaves behind when another host is unreachable: node 0's agent waits
    # in the rendezvous store for node 1 (one C++ call of up to 600 s, so its SIGTERM handler
    # cannot run) when its stdin closes. [Note: stdin watchdog] ends it after 2 x 1 + 10 s.
    world = OrderedDict([("localhost", [0]), ("127.0.0.1", [0])])
    port = free_port()
    argv = [sys.executable, "-u", "-m", "ds_launch.agent", f"--world_info={encode_world_info(world)}"]
    argv += ["--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={port}", "--term_timeout=1"]
    argv += ["--watch_stdin", "--", str(WORKER), str(tmp_path)]
    proc = subprocess.Popen(argv, env=launcher_env, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + scaled(60)
        while not _listening(port):
            assert proc.poll() is None and time.monotonic() < deadline, "the agent never opened its store"
            time.sleep(0.1)
        proc.stdin.close()  # the launcher went away
        try:
            proc.wait(timeout=scaled(12 + 20))
        except subprocess.TimeoutExpired:
            pytest.fail("the agent is still waiting in the rendezvous after its stdin closed")
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "the agent did not stop after its launcher went away" in err
    assert not read_reports(tmp_path)  # no worker ever started
