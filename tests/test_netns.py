"""Tests of tests/netns.py, the fake multi-host cluster the multi-host pool tests are built on:
hosts reach each other but not the real network, partitions and freezes behave like the real
thing, and nothing (namespace, interface, process) survives a cluster."""

from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.conftest import pid_alive, wait_until
from tests.netns import CleanupError, Cluster, Host, netns_cluster, netns_list, require_netns  # noqa: F401

PORT = 7777  # every host has its own port space, so a fixed port can't collide

SERVER = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=16)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    try:
        with conn:
            conn.sendall(conn.recv(64))
    except OSError:
        pass  # a client that gave up (e.g. while we were stopped) must not end the server
"""

# Prints "echo:<reply>" or "<phase>:<exception type>", phase being where it failed.
CLIENT = r"""
import socket, sys
phase = "connect"
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        phase = "recv"
        s.sendall(b"ping")
        print("echo:" + s.recv(64).decode())
except OSError as e:
    print(f"{phase}:{type(e).__name__}")
"""


def start_echo(host: Host) -> subprocess.Popen[Any]:
    proc = host.popen([sys.executable, "-c", SERVER, host.ip, str(PORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 5.0)
    assert ready and proc.stdout.readline().strip() == "ready", "echo server did not start"
    return proc


def ask(client: Host, server: Host, timeout: float = 1.0) -> str:
    """What a client in ``client`` gets from the echo port of ``server``."""
    argv = [sys.executable, "-c", CLIENT, server.ip, str(PORT), str(timeout)]
    return client.run(argv, timeout=timeout + 5).stdout.strip()


def root_net() -> tuple[list[str], list[str], str]:
    """The root namespace's interfaces, addresses and routes (lifetimes and counters left out)."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=5).stdout
    links = re.findall(r"^\d+: ([^:@\s]+)", out, re.M)
    addrs = [
        " ".join(line.split()[1:4])
        for line in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=5).stdout.splitlines()
    ]
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True, timeout=5).stdout
    return links, addrs, routes


def test_hosts_reach_each_other_not_the_root_namespace(netns_cluster: Callable[[int], Cluster]) -> None:  # noqa: F811
    before = root_net()
    cluster = netns_cluster(2)
    a, b = cluster.hosts
    assert set(cluster.namespaces) <= set(netns_list())
    start_echo(a)
    assert ask(b, a) == "echo:ping"
    assert ask(a, a) == "echo:ping"  # a host reaches its own address too
    # The root namespace has no way in. Depending on the machine its connect fails (no route, or
    # out the real default route into nothing) or is taken by something on the real network (a
    # sandbox's transparent egress proxy accepts every connect): it never reaches our server.
    reply = b""
    t0 = time.monotonic()
    try:
        with socket.create_connection((a.ip, PORT), timeout=0.5) as sock:
            sock.sendall(b"ping")
            reply = sock.recv(64)
    except OSError:
        pass
    assert reply != b"ping", "the root namespace reached a host's server"
    assert time.monotonic() - t0 < 2
    assert root_net() == before, "the cluster added an interface, address or route to the root namespace"


def test_link_down_partitions_and_link_up_heals(netns_cluster: Callable[[int], Cluster]) -> None:  # noqa: F811
    a, b = netns_cluster(2).hosts
    start_echo(a)
    assert ask(b, a) == "echo:ping"
    assert ask(a, b) == "connect:ConnectionRefusedError"  # reachable, nothing listens on b
    a.link_down()
    t0 = time.monotonic()
    # Silence both ways, like a pulled cable: timeouts, not refusals.
    assert ask(b, a, timeout=1.0) in ("connect:TimeoutError", "connect:OSError")
    assert ask(a, b, timeout=1.0) in ("connect:TimeoutError", "connect:OSError")
    assert time.monotonic() - t0 < 5
    assert a.pids(), "a partition must not touch the host's processes"
    a.link_up()
    assert wait_until(lambda: ask(b, a) == "echo:ping", 5.0)
    assert ask(a, b) == "connect:ConnectionRefusedError"


def test_stop_cont_and_kill_all(netns_cluster: Callable[[int], Cluster]) -> None:  # noqa: F811
    a, b = netns_cluster(2).hosts
    server = start_echo(a)
    bystander = b.popen(["sleep", "60"])

    def state(pid: int) -> str:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]

    assert a.pids() == [server.pid] and b.pids() == [bystander.pid]
    assert a.kill_all(signal.SIGSTOP) == [server.pid]
    assert wait_until(lambda: state(server.pid) == "T", 2.0)
    # A frozen host still completes the handshake (the kernel's backlog) but never answers.
    assert ask(b, a, timeout=1.0) == "recv:TimeoutError"
    a.kill_all(signal.SIGCONT)
    assert ask(b, a) == "echo:ping"
    assert a.kill_all(signal.SIGKILL) == [server.pid]
    assert wait_until(lambda: not a.pids(), 2.0)
    assert server.wait(timeout=5) == -signal.SIGKILL
    assert ask(b, a, timeout=1.0) == "connect:ConnectionRefusedError"  # host up, process gone
    assert pid_alive(bystander.pid), "kill_all must only reach its own host"


def test_cleanup_after_exception_and_after_failed_creation() -> None:
    require_netns()
    before = root_net()
    with pytest.raises(RuntimeError, match="boom"):
        with Cluster(3) as cluster:
            procs = [h.popen(["sleep", "60"]) for h in cluster.hosts]
            cluster.hosts[0].kill_all(signal.SIGSTOP)  # a frozen process must not block cleanup
            names = cluster.namespaces
            raise RuntimeError("boom")
    assert not set(names) & set(netns_list())
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 3  # killed and reaped
    # A creation step failing half way (an invalid address, after two namespaces exist).
    bad = Cluster(2, subnet="10.213.300")
    with pytest.raises(RuntimeError, match="addr add"):
        bad.__enter__()
    assert not set(bad.namespaces) & set(netns_list())
    assert root_net() == before


def test_close_reports_what_it_could_not_remove(monkeypatch: pytest.MonkeyPatch) -> None:
    require_netns()
    cluster = Cluster(1).__enter__()
    real_ip = netns._ip
    fake_ip = lambda *a, check=True: None if a[:2] == ("netns", "del") else real_ip(*a, check=check)  # noqa: E731
    monkeypatch.setattr(netns, "_ip", fake_ip)  # `ip netns del` silently does nothing
    with pytest.raises(CleanupError, match=cluster.hosts[0].ns):
        cluster.close()  # (the fixture turns this into a failed test)
    monkeypatch.undo()
    cluster.close()
    assert not set(cluster.namespaces) & set(netns_list())


def test_stale_namespaces_of_a_crashed_run_are_swept() -> None:
    require_netns()
    stale = f"ldh0-{2**22 + 1}-dead"  # the creator's pid is above any pid_max: surely gone
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=5)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        assert wait_until(lambda: Host("x", stale, "", "", "").pids() == [orphan.pid], 2.0)
        with Cluster(1) as cluster:
            assert stale not in netns_list() and cluster.hosts[0].ns in netns_list()
        assert orphan.wait(timeout=5) == -signal.SIGKILL
    finally:
        orphan.kill()
        orphan.wait(timeout=5)
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=5)
