"""Two real hosts on this machine: two network namespaces joined by a veth pair, each running
its own sshd (Debian openssh-server, keys made for the test). ds-launch runs in the first
namespace, as on a cluster's head node, and reaches both "hosts" over real ssh.

Everything is created with names unique to this run, in the 10.233.0.0/16 test range, inside
namespaces we own (no traffic leaves them), and removed in the fixture's finalizer even when
a test fails. Skipped where network namespaces are not permitted (not root / no
CAP_NET_ADMIN) or the ssh tools are missing (`nox` installs them itself when it can, see
noxfile.py); with CI set in the environment missing tools are a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _dsl_helpers import WORKER, alive, free_port, read_reports

from zero_testkit import scaled

pytestmark = pytest.mark.timeout(240)


def _missing_tool(what: str) -> None:
    """A tool from .ci/apt-packages.txt is not installed: skip, saying what to install (fail under CI)."""
    msg = f"{what} (sudo apt-get install $(grep -v '^#' .ci/apt-packages.txt); `nox` does this itself as root)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


IFNAME = "dslnet"  # the same interface name in both namespaces, so one GLOO_SOCKET_IFNAME fits all


@dataclass
class Hosts:
    """The two test hosts: namespace names, addresses, ssh key, scratch dir."""

    namespaces: tuple[str, str]
    addrs: tuple[str, str]
    key: Path
    tmp: Path

    def hostfile(self) -> Path:
        path = self.tmp / "hostfile"
        path.write_text(f"# two namespaces\n{self.addrs[0]} slots=2\n{self.addrs[1]} slots=2\n")
        return path


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _must(*argv: str) -> None:
    res = _run(*argv)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")


def _sshd_config(tmp: Path, name: str, addr: str) -> Path:
    host_key = tmp / f"hostkey_{name}"
    _must("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    config = tmp / f"sshd_{name}.conf"
    config.write_text(
        f"ListenAddress {addr}\nPort 22\nHostKey {host_key}\nPidFile {tmp / f'sshd_{name}.pid'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nUseDNS no\n"
    )
    return config


def _wait_port(ns: str, addr: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(({addr!r}, 22), timeout=1).close()"
    while _run("ip", "netns", "exec", ns, sys.executable, "-c", probe).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd on {addr} in {ns} did not start")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN); not permitted for this user")
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            _missing_tool(f"{tool} not found: install iproute2 and openssh-client")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        _missing_tool("sshd not found: install openssh-server")
    tag = secrets.token_hex(3)
    ns = (f"dsl{tag}a", f"dsl{tag}b")
    subnet = secrets.randbelow(250) + 1
    addrs = (f"10.233.{subnet}.1", f"10.233.{subnet}.2")
    tmp = tmp_path_factory.mktemp("two_hosts")
    probe = _run("ip", "netns", "add", ns[0])
    if probe.returncode != 0:
        if "permit" in probe.stderr.lower() or "denied" in probe.stderr.lower():
            pytest.skip(f"network namespaces not permitted here: {probe.stderr.strip()}")
        raise RuntimeError(f"ip netns add failed: {probe.stderr.strip()}")
    sshds: list[subprocess.Popen] = []
    try:
        _must("ip", "netns", "add", ns[1])
        veth = (f"dsl{tag}x", f"dsl{tag}y")
        _must("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for name, dev, addr in zip(ns, veth, addrs, strict=True):
            _must("ip", "link", "set", dev, "netns", name)
            _must("ip", "-n", name, "link", "set", dev, "name", IFNAME)
            _must("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _must("ip", "-n", name, "link", "set", IFNAME, "up")
            _must("ip", "-n", name, "link", "set", "lo", "up")
        key = tmp / "id_test"
        _must("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        (tmp / "authorized_keys").write_text((tmp / "id_test.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True)  # Debian sshd's privilege-separation directory
        for name, addr in zip(ns, addrs, strict=True):
            config = _sshd_config(tmp, name, addr)
            log = tmp / f"sshd_{name}.log"
            sshds.append(subprocess.Popen(["ip", "netns", "exec", name, sshd, "-D", "-f", str(config), "-E", str(log)]))
        for name, addr in zip(ns, addrs, strict=True):
            _wait_port(name, addr)
        yield Hosts(ns, addrs, key, tmp)
    finally:
        for proc in sshds:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in ns:
            # Anything still running in our namespaces is ours (sshd sessions, a stuck worker).
            # SIGTERM first: a login shell's own cleanup (e.g. a shim-rehash lock) gets to run.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in _run("ip", "netns", "pids", name).stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), sig)
                time.sleep(0.5 if sig == signal.SIGTERM else 0)
            _run("ip", "netns", "delete", name)  # also removes the veth pair


def _launch(
    hosts: Hosts, out: Path, extra: list[str], worker_args: list[str], launcher: str = "ssh"
) -> tuple[subprocess.CompletedProcess, float]:
    env_file = hosts.tmp / "test.env"
    env_file.write_text("# exported to every node, verbatim\nDSL_TEST_VALUE=two hosts=$ok 'x'\n")
    env = dict(os.environ, GLOO_SOCKET_IFNAME=IFNAME, DS_ENV_FILE=str(env_file), OMP_NUM_THREADS="1")
    env["DS_LAUNCH_SSH_ARGS"] = "-o UserKnownHostsFile=/dev/null"  # leave root's known_hosts alone
    argv = ["ip", "netns", "exec", hosts.namespaces[0], sys.executable, "-m", "ds_launch"]
    argv += ["--hostfile", str(hosts.hostfile()), "--launcher", launcher, "--ssh_identity", str(hosts.key)]
    argv += ["--master_port", str(free_port()), *extra]
    argv += [str(WORKER), str(out), *worker_args]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=scaled(180), cwd=hosts.tmp)
    return proc, time.time()


def test_two_nodes_two_workers_each(hosts: Hosts, tmp_path: Path) -> None:
    proc, _ = _launch(hosts, tmp_path, [], ["a b", "$HOME", "it's", "100%"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = read_reports(tmp_path)
    assert sorted(reports) == [0, 1, 2, 3]
    for rank, r in reports.items():
        node = rank // 2
        assert r["addr"] == hosts.addrs[node], r  # each rank runs in its own host's namespace
        assert r["world_size"] == 4 and r["local_rank"] == rank % 2 and r["local_size"] == 2
        assert r["sum"] == 10.0
        assert r["argv"] == [f"--local_rank={rank % 2}", str(tmp_path), "a b", "$HOME", "it's", "100%"]
        assert r["test_value"] == "two hosts=$ok 'x'"
    assert reports[0]["netns"] == reports[1]["netns"] != reports[2]["netns"] == reports[3]["netns"]
    assert f"{hosts.addrs[1]}: rank 3/4 sum=10.0" in proc.stdout  # output comes home, host-prefixed


@pytest.mark.parametrize("launcher", ["ssh", "pdsh"])
def test_one_node_failure_stops_the_other(hosts: Hosts, tmp_path: Path, launcher: str) -> None:
    term_timeout = 3
    if launcher == "pdsh" and shutil.which("pdsh") is None:
        _missing_tool("pdsh not found: install pdsh")
    # "100%": pdsh substitutes %-escapes in the remote command, so this checks our escaping.
    worker_args = ["--fail-rank", "3", "--fail-code", "7", "--spawn-child", "100%", "a b"]
    proc, end = _launch(hosts, tmp_path, ["--term_timeout", str(term_timeout)], worker_args, launcher)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert f"rank 3 (local rank 1) on host {hosts.addrs[1]} exited with code 7" in proc.stderr
    assert "rank 3 failing on purpose with code 7" in proc.stderr
    failed_at = float((tmp_path / "fail_time").read_text())
    assert end - failed_at < term_timeout + 12, end - failed_at
    reports = read_reports(tmp_path)
    assert sorted(reports) == [0, 1, 2, 3]
    for rank, r in reports.items():
        assert r["addr"] == hosts.addrs[rank // 2] and r["sum"] == 10.0
        assert r["argv"][-2:] == ["100%", "a b"]
        assert not alive(r["pid"]), f"rank {r['rank']} survived"
        assert not alive(r["child_pid"]), f"rank {r['rank']}'s child survived"


@pytest.mark.parametrize("launcher", ["ssh", "pdsh"])
def test_sigterm_to_launcher_stops_both_nodes(hosts: Hosts, tmp_path: Path, launcher: str) -> None:
    env = dict(
        os.environ, GLOO_SOCKET_IFNAME=IFNAME, OMP_NUM_THREADS="1", DS_LAUNCH_SSH_ARGS="-o UserKnownHostsFile=/dev/null"
    )
    env.pop("DS_ENV_FILE", None)
    argv = ["ip", "netns", "exec", hosts.namespaces[0], sys.executable, "-m", "ds_launch"]
    argv += ["--hostfile", str(hosts.hostfile()), "--ssh_identity", str(hosts.key), "--master_port", str(free_port())]
    argv += ["--launcher", launcher, "--term_timeout", "3", str(WORKER), str(tmp_path), "--hang", "--spawn-child"]
    # `ip netns exec` execs the launcher, so this pid is the launcher's.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=hosts.tmp)
    try:
        deadline = time.monotonic() + 120
        while len(read_reports(tmp_path)) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    # The remote agents tear their workers down asynchronously (term_timeout, then SIGKILL) once their
    # session closes: allow that, scaled for a loaded machine, but no longer.
    reports = read_reports(tmp_path).values()
    deadline = time.monotonic() + scaled(20)
    while any(alive(r["pid"]) or alive(r["child_pid"]) for r in reports) and time.monotonic() < deadline:
        time.sleep(0.2)
    for r in reports:
        assert not alive(r["pid"]) and not alive(r["child_pid"]), f"rank {r['rank']} survived"


def test_unreachable_host_stops_the_job(hosts: Hosts, tmp_path: Path) -> None:
    # ssh to the second host fails at once; node 0's agent, waiting in the rendezvous for it,
    # must be stopped too (its ssh stdin is closed), and the launcher names the host.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{hosts.addrs[0]} slots=1\nno-such-host.invalid slots=1\n")
    env = dict(os.environ, DS_LAUNCH_SSH_ARGS="-o UserKnownHostsFile=/dev/null")
    argv = ["ip", "netns", "exec", hosts.namespaces[0], sys.executable, "-m", "ds_launch", "--hostfile", str(hostfile)]
    argv += ["--ssh_identity", str(hosts.key), "--master_port", str(free_port()), "--term_timeout", "2"]
    proc = subprocess.run(
        [*argv, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=scaled(90)
    )
    assert proc.returncode == 255, proc.stderr
    assert "node process on host no-such-host.invalid exited with status 255" in proc.stderr
    # The agent that was waiting for the rendezvous is gone too (it may still be importing
    # torch when its stdin closes, so give it a moment on a loaded machine).
    deadline = time.monotonic() + scaled(30)
    while _agents_in(hosts.namespaces[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _agents_in(hosts.namespaces[0]) == []


def _agents_in(ns: str) -> list[str]:
    """Command lines of ds_launch processes in namespace ``ns``."""
    found = []
    for pid in _run("ip", "netns", "pids", ns).stdout.split():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "ds_launch" in cmdline:
                found.append(cmdline)
    return found
