"""Fake multi-host clusters on one machine: every "host" is a Linux network namespace.

Each host namespace has loopback up and one veth whose host end is ``eth0`` (``SUBNET.<i+1>/24``);
the other end is a port of a bridge that lives in a namespace of its own, so nothing is ever added
to the machine's real network namespace (no interface, address or route). Faults are injected per
host: :meth:`Host.kill_all` (SIGKILL = crash, SIGSTOP = freeze, SIGCONT = thaw) and
:meth:`Host.link_down` (a pulled cable). Tests use the ``netns_cluster`` factory fixture
(``a, b = netns_cluster(2).hosts``) or ``with Cluster(n) as cluster:``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

SUBNET = "10.213.77"  # a /24 that home, cloud and docker defaults leave alone; hosts are .1, .2, ...
NETNS_DIR = "/run/netns"  # where `ip netns add` pins namespaces (bind mounts of nsfs inodes)
BRIDGE = "br0"
# Only names of this shape are ever touched (created, swept as stale, deleted): ldbr-<pid>-<hex>
# for the bridge and ldh<i>-<pid>-<hex> for host i, where <pid> is the creating test process.
_NAME = re.compile(r"^ld(?:br|h\d+)-(\d+)-([0-9a-f]+)$")
_live: set[str] = set()  # cluster ids of this process that are still open (not stale)
# Rootless works in a user namespace that also has its own network namespace (iproute2 switches
# back to the caller's namespace after `ip netns add`, which needs CAP_SYS_ADMIN over it) and a
# writable /run/netns; the suite then runs with only its own loopback.
ROOTLESS = (
    "run as root, or rootless as `unshare -Urnm sh -c 'mount -t tmpfs none /run/netns && "
    "ip link set lo up && python -m pytest ...'` (mount on /run if /run/netns does not exist)"
)


class CleanupError(RuntimeError):
    """A namespace (or a process in one) outlived its cluster."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def netns_list() -> list[str]:
    """Names in `ip netns list` (a line is "name" or "name (id: N)")."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _in_ns(pid: int, pin: os.stat_result) -> bool:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # exited meanwhile, or a zombie whose namespaces are already released
    return (st.st_dev, st.st_ino) == (pin.st_dev, pin.st_ino) and stat[stat.rindex(")") + 2] not in "ZX"


def pids_in(ns: str) -> list[int]:
    """Live (non-zombie) processes whose network namespace is ``ns``: same nsfs inode as its pin."""
    try:
        pin = os.stat(f"{NETNS_DIR}/{ns}")
    except OSError:
        return []  # no such namespace (any more)
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _in_ns(int(e.name), pin)]


def kill_ns(ns: str, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every process in ``ns``; returns the pids signalled."""
    pids = pids_in(ns)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def _empty_and_delete(ns: str, deadline: float) -> None:
    # A namespace outlives `ip netns del` while a process is in it, so empty it first.
    while kill_ns(ns) and time.monotonic() < deadline:
        time.sleep(0.01)
    _ip("netns", "del", ns, check=False)


def remove_stale() -> list[str]:
    """Delete namespaces left by a crashed run of this helper: our name shape, and the creating
    process is gone (or it is us, but the cluster is closed). A parallel run's ones stay."""
    stale = []
    for ns in os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []:
        m = _NAME.match(ns)
        if m is None or f"{m[1]}-{m[2]}" in _live:
            continue
        if int(m[1]) != os.getpid() and os.path.exists(f"/proc/{m[1]}"):
            continue  # its creator (a parallel run) is alive
        _empty_and_delete(ns, time.monotonic() + 5)
        stale.append(ns)
    return stale


class Host:
    """One fake host: a network namespace with ``eth0`` at ``ip``."""

    def __init__(self, name: str, ns: str, ip: str, port: str, bridge_ns: str) -> None:
        self.name, self.ns, self.ip = name, ns, ip
        self._port, self._bridge_ns = port, bridge_ns  # the bridge-side end of this host's veth
        self.procs: list[subprocess.Popen[Any]] = []  # started here; the cluster reaps them

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, ip={self.ip!r})"

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the host. `ip netns exec` execs it in place (so the Popen's pid is
        the process itself, signals reach it directly) and keeps the environment (venv PATH).
        Returns once the child is in the namespace, so pids()/kill_all() can't miss it."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)
        self.procs.append(proc)
        pin, deadline = os.stat(f"{NETNS_DIR}/{self.ns}"), time.monotonic() + 5
        while not _in_ns(proc.pid, pin) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        return proc

    def run(self, argv: Sequence[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the host to completion, capturing text output; never raises on rc."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True, timeout=timeout, **kw
        )

    def link_down(self) -> None:
        """Partition the host: take its bridge port down, i.e. pull the cable. Its ``eth0`` stays
        up with its address and route (carrier lost), so traffic either way vanishes silently,
        as on a real partition, instead of failing fast with ENETUNREACH as an admin-down
        ``eth0`` would."""
        _ip("-n", self._bridge_ns, "link", "set", self._port, "down")

    def link_up(self) -> None:
        """Heal the partition (the bridge has no STP, so the port forwards at once)."""
        _ip("-n", self._bridge_ns, "link", "set", self._port, "up")

    def pids(self) -> list[int]:
        """Every live process whose network namespace is this host's (children or not)."""
        return pids_in(self.ns)

    def kill_all(self, sig: int) -> list[int]:
        """Signal every process of the host: SIGKILL = crash, SIGSTOP = freeze, SIGCONT = thaw."""
        return kill_ns(self.ns, sig)


class Cluster:
    """``n_hosts`` hosts on one bridge; a context manager that removes everything on exit."""

    def __init__(self, n_hosts: int = 2, subnet: str = SUBNET) -> None:
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.bridge_ns = f"ldbr-{self.id}"
        self.hosts = [
            Host(f"h{i}", f"ldh{i}-{self.id}", f"{subnet}.{i + 1}", f"v{i}", self.bridge_ns) for i in range(n_hosts)
        ]

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *(h.ns for h in self.hosts)]

    def __enter__(self) -> Cluster:
        remove_stale()
        _live.add(self.id)
        try:
            self._create()
        except BaseException:
            self.close()  # a half-built cluster is torn down too; the creation error wins
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        br = self.bridge_ns
        _ip("netns", "add", br)
        _ip("-n", br, "link", "add", BRIDGE, "type", "bridge")  # STP off by default: ports forward at once
        _ip("-n", br, "link", "set", BRIDGE, "up")
        for h in self.hosts:
            _ip("netns", "add", h.ns)
            _ip("-n", h.ns, "link", "set", "lo", "up")  # gloo/ZMQ/TCPStore on 127.0.0.1 need it
            # Created inside the bridge namespace with the peer sent straight to the host, so the
            # pair never exists in the root namespace, even for a moment.
            _ip("-n", br, "link", "add", h._port, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _ip("-n", br, "link", "set", h._port, "master", BRIDGE, "up")
            # No IPv6 link-local: eth0's only address is the IPv4 one, so tools that pick "the
            # address of eth0" (GLOO_SOCKET_IFNAME) get it, and no IPv6 chatter crosses the bridge.
            _ip("-n", h.ns, "link", "set", "eth0", "addrgenmode", "none")
            _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")

    def close(self, timeout: float = 10.0) -> None:
        """Kill every process in the namespaces, reap the ones we started, delete veths and
        namespaces; raise :class:`CleanupError` if any of them is still there. Idempotent."""
        deadline = time.monotonic() + timeout
        existing = set(netns_list())
        for h in self.hosts:  # explicitly: a namespace's devices otherwise go later, asynchronously
            if self.bridge_ns in existing:  # deleting one end of a veth deletes both
                _ip("-n", self.bridge_ns, "link", "del", h._port, check=False)
        for ns in self.namespaces[1:] + self.namespaces[:1]:
            if ns in existing:
                _empty_and_delete(ns, deadline)  # SIGKILL ends stopped processes too
        for proc in (p for h in self.hosts for p in h.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))  # reap: no zombie, no leak report
            except subprocess.TimeoutExpired:
                pass
        _live.discard(self.id)
        left = [ns for ns in netns_list() if ns in self.namespaces]
        alive = [p.pid for h in self.hosts for p in h.procs if p.poll() is None]
        if left or alive:
            raise CleanupError(f"cluster {self.id}: namespaces {left} and processes {alive} outlived it")


_probe_result: list[str | None] = []  # cached: the probe costs a few `ip` calls


def unavailable_reason() -> str | None:
    """Why this machine can't build clusters (None if it can): no `ip`, not root, or the kernel
    or container refuses namespaces, bridges or veths (probed once by building a tiny one)."""
    if not _probe_result:
        if shutil.which("ip") is None:
            reason: str | None = "iproute2's `ip` command is not installed"
        elif os.geteuid() != 0:
            reason = f"network namespaces need root: {ROOTLESS}"
        else:
            ns = f"ldbr-{os.getpid()}-0"  # our name shape, so a crash here is swept as stale
            steps = [
                ("netns", "add", ns),
                ("-n", ns, "link", "add", BRIDGE, "type", "bridge"),
                ("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"),
            ]
            failed = next((p for p in (_ip(*s, check=False) for s in steps) if p.returncode), None)
            _ip("netns", "del", ns, check=False)
            reason = f"cannot create network namespaces ({failed.stderr.strip()}): {ROOTLESS}" if failed else None
        _probe_result.append(reason)
    return _probe_result[0]


def require_netns() -> None:
    """Skip the calling test when clusters can't be built here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def netns_cluster() -> Iterator[Callable[[int], Cluster]]:
    """Factory: ``netns_cluster(n_hosts)`` returns an entered :class:`Cluster`; all are closed
    after the test (before the leak check), and the test fails if one could not be removed."""
    require_netns()
    clusters: list[Cluster] = []

    def make(n_hosts: int = 2) -> Cluster:
        clusters.append(Cluster(n_hosts).__enter__())
        return clusters[-1]

    yield make
    errors = []
    for cluster in reversed(clusters):
        try:
            cluster.close()
        except CleanupError as e:
            errors.append(str(e))
    if errors:  # a namespace that outlives its test would leak into the next ones
        pytest.fail("; ".join(errors))
