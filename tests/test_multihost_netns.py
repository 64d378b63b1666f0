"""A pool across hosts where every host is a network namespace (issue: scale-out).

``h1`` runs the driver (``tests/netns_driver.py``), the others run ``lightdist agent``; they reach
each other only through a bridge that lives in its own namespace, so the addresses, interfaces and
partitions are real. Faults: a host's link taken down (partition), its processes frozen (SIGSTOP)
or killed (crash). Skipped where network namespaces cannot be made (needs root; see tests/netns.py).
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lightdist._attach import HOST_TIMEOUT_S, LEASE_S
from lightdist.keys import create_pool_keys
from tests.conftest import wait_until
from tests.netns import Cluster, Host, netns_cluster  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
PORT = 29400


class Driver:
    """The driver process in a host namespace, spoken to by JSON lines."""

    def __init__(self, host: Host, key: Path, nodes: int, world_size: int) -> None:
        self.address = f"tcp://{host.ip}:{PORT}"
        self.proc = host.popen(
            [sys.executable, "-m", "tests.netns_driver", self.address, str(key), str(nodes), str(world_size)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.store_port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):  # the ranks' output reaches the driver's stdout too ("[h2 rank 1] ...")
                self.lines.put(line)

    def reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return dict(json.loads(self.lines.get(timeout=0.2)))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the driver exited with {self.proc.returncode}") from None
        raise AssertionError(f"the driver said nothing for {timeout} s")

    def call(self, payload: dict[str, Any] | None = None) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"payload": payload or {}}) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # the driver stops its pool and exits
        self.proc.wait(timeout=20)


def agent(host: Host, driver: Driver, key: Path, name: str, nproc: int = 2, hint: int | None = None) -> Any:
    env = {"SLURM_NODEID": str(hint)} if hint is not None else {}
    import os

    return host.popen(
        [
            sys.executable,
            "-m",
            "lightdist.cli",
            "agent",
            "--connect",
            driver.address,
            "--key-file",
            str(key),
            "--nproc-per-node",
            str(nproc),
            "--host-name",
            name,
            "--connect-timeout",
            "30",
        ],
        env={**os.environ, **env, "LIGHTDIST_TEST_HOST": name},
        stdout=subprocess.DEVNULL,
    )


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return create_pool_keys(tmp_path / "keys")


@pytest.fixture
def pool(netns_cluster: Callable[[int], Cluster], keys: tuple[Path, Path]) -> Iterator[tuple[Cluster, Driver]]:  # noqa: F811
    cluster = netns_cluster(4)
    driver = Driver(cluster.hosts[0], keys[0], nodes=2, world_size=4)
    agent(cluster.hosts[1], driver, keys[1], "h2", hint=0)
    agent(cluster.hosts[2], driver, keys[1], "h3", hint=1)
    ready = driver.reply(timeout=90)
    assert ready["ready"] and ready["hosts"] == {"h2": [0, 1], "h3": [2, 3]}
    driver.store_port = ready["store_port"]
    try:
        yield cluster, driver
    finally:
        driver.stop()


def test_namespaced_hosts_form_one_pool_over_their_own_interfaces(pool: tuple[Cluster, Driver]) -> None:
    cluster, driver = pool
    driver.call()
    reply = driver.reply(timeout=30)
    assert reply["ok"], reply
    ranks = reply["out"]["ranks"]
    assert reply["out"]["sum"] == 10
    assert [r["env"]["LIGHTDIST_TEST_HOST"] for r in ranks] == ["h2", "h2", "h3", "h3"]
    # gloo advertises the interface that routes to the driver; 127.0.0.1 would not reach the peers
    assert {r["env"]["GLOO_SOCKET_IFNAME"] for r in ranks} == {"eth0"}
    # in the driver's namespace, the channel and the store listen on the pool's address only
    listening = _listening(driver.proc.pid)
    ip_hex = "".join(f"{int(part):02X}" for part in reversed(cluster.hosts[0].ip.split(".")))
    assert listening[PORT] == {ip_hex} and listening[driver.store_port] == {ip_hex}, listening


def _listening(pid: int) -> dict[int, set[str]]:
    """{port: local addresses} of the LISTEN sockets in ``pid``'s network namespace (IPv4 and IPv6)."""
    found: dict[int, set[str]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, port = local.split(":")
            if state == "0A":
                found.setdefault(int(port, 16), set()).add(address)
    return found


ROGUE = """
import sys, time, zmq
from lightdist.keys import load_client_keys, secure_client
from lightdist.protocol import Kind, Session
address, mode, key_file, evil = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.IDENTITY, b"agent.rogue")
if mode != "plain":
    keys = load_client_keys(key_file)
    if mode == "unlisted":  # the right server key, a client keypair the driver never allowed
        import dataclasses
        public, secret = zmq.curve_keypair()
        keys = dataclasses.replace(keys, public_key=public, secret_key=secret)
    secure_client(sock, keys)
sock.connect(address)
forger = Session(b"not the pool's key, 32 bytes....", "agent.rogue", -2)
for kind in (Kind.HELLO, Kind.HOST_EVENT, Kind.RESULT, Kind.CALL):
    sock.send_multipart(forger.pack(kind, 1, [evil]))          # forged signature
    sock.send_multipart([b"x" * 32, b"garbage", evil])         # not even a header
time.sleep(1.5)
sock.close(linger=0)
ctx.term()
"""


def test_a_third_host_without_keys_or_with_forged_frames_executes_nothing(
    pool: tuple[Cluster, Driver], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    import pickle

    cluster, driver = pool
    rogue_host = cluster.hosts[3]
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Opener(str(marker)))
    _, stranger = create_pool_keys(tmp_path / "stranger")
    driver.call()
    before = driver.reply(timeout=30)
    # no CURVE at all / another pool's keys / a client key the driver does not allow / the pool's own
    # client key (stolen, say) with frames signed by a wrong HMAC key
    for mode, key in (("plain", keys[1]), ("stranger", stranger), ("unlisted", keys[1]), ("forged", keys[1])):
        rogue_host.run([sys.executable, "-c", ROGUE, driver.address, mode, str(key), evil.hex()], timeout=30)
    driver.call()
    after = driver.reply(timeout=30)
    assert after["ok"] and after["out"]["sum"] == 10, after  # still serving, same pool
    assert after["hosts"] == before["hosts"]
    assert not marker.exists(), "a rogue frame was unpickled"
    assert after["denied"] > before["denied"], "the unknown CURVE key was refused at the handshake"
    assert after["rejected"] >= before["rejected"] + 8, "the forged frames were dropped by the signature check"


class _Opener:
    """Unpickling this anywhere creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_partitioned_host_is_lost_in_2_s_a_spare_takes_over_and_it_never_rejoins(
    pool: tuple[Cluster, Driver], keys: tuple[Path, Path]
) -> None:
    cluster, driver = pool
    spare_host, lost_host = cluster.hosts[3], cluster.hosts[2]
    agent(spare_host, driver, keys[1], "spare")
    time.sleep(1.0)  # the spare attaches
    old_ranks = set(lost_host.pids())
    driver.call({"sleep": 60.0})
    time.sleep(1.0)
    lost_host.link_down()  # pulled cable: no error anywhere, just silence
    cut = time.monotonic()
    reply = driver.reply(timeout=30)
    detected = time.monotonic() - cut
    assert not reply["ok"] and reply["type"] == "WorkerDiedError" and "host h3 was lost" in reply["error"], reply
    assert detected < HOST_TIMEOUT_S + 1.5, f"{detected:.1f} s to declare the partitioned host lost"
    driver.call()
    reply = driver.reply(timeout=60)
    assert reply["ok"] and reply["out"]["sum"] == 10, reply
    assert reply["hosts"] == {"h2": [0, 1], "spare": [2, 3]}
    # healed: the old agent was fenced (or its lease ran out); its ranks die, nothing rejoins
    lost_host.link_up()
    assert wait_until(lambda: not (set(lost_host.pids()) & old_ranks), LEASE_S + 3), "old ranks survived"
    driver.call()
    reply = driver.reply(timeout=30)
    assert reply["ok"] and reply["hosts"] == {"h2": [0, 1], "spare": [2, 3]}


def test_a_frozen_host_fails_the_call_naming_it(pool: tuple[Cluster, Driver]) -> None:
    cluster, driver = pool
    driver.call({"sleep": 60.0})
    time.sleep(1.0)
    cluster.hosts[1].kill_all(signal.SIGSTOP)
    frozen = time.monotonic()
    reply = driver.reply(timeout=30)
    assert not reply["ok"] and "host h2 was lost" in reply["error"], reply
    assert time.monotonic() - frozen < HOST_TIMEOUT_S + 1.5
    cluster.hosts[1].kill_all(signal.SIGCONT)
    assert wait_until(lambda: not cluster.hosts[1].pids(), LEASE_S + 3), "the thawed host kept its processes"


def test_a_crashed_driver_host_takes_every_agent_down_within_the_lease(pool: tuple[Cluster, Driver]) -> None:
    cluster, driver = pool
    cluster.hosts[0].kill_all(signal.SIGKILL)
    crashed = time.monotonic()
    agents = cluster.hosts[1:3]
    assert wait_until(lambda: not any(h.pids() for h in agents), LEASE_S + 2), "agents outlived the driver"
    assert time.monotonic() - crashed <= LEASE_S + 1.5
