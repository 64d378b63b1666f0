"""A pool across hosts, with each "host" a real ``lightdist agent`` process on this machine's loopback.

The driver is this test process (``DistributedRunner(nodes=..., listen=..., key_file=...)``); agents
run the real console entry point and fork their ranks with the real template; CURVE, the allow-list
and HMAC signing are all on. A host fault is applied to the agent's whole process tree (agent,
template, ranks): SIGKILL is a crash, SIGSTOP a freeze. ``tests/test_netns.py``-based tests repeat
the network-level faults (partitions) with one network namespace per host.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from lightdist import DistributedRunner, DistributedWorker, PoolClosedError, WorkerDiedError, WorkerFailedError
from lightdist._attach import HOST_TIMEOUT_S, LEASE_S
from lightdist.agent import EXIT_REFUSED, EXIT_RETRY, EXIT_STOPPED
from lightdist.keys import create_pool_keys
from tests.conftest import descendants, free_port, pid_alive, wait_until


class Gather(DistributedWorker):
    """Every rank's view of itself, gathered to rank 0, plus an all-reduce across hosts."""

    def setup(self, blob: str = "") -> None:
        self.blob_size = len(blob)

    def __call__(
        self, streaming: bool = False, sleep: float = 0.0, sleepers: list[int] | None = None
    ) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        # ``sleepers``: only these ranks sleep; the others wait for them in the all-reduce
        deadline = time.monotonic() + (sleep if sleepers is None or self.rank in sleepers else 0.0)
        while time.monotonic() < deadline and not self.cancelled:
            time.sleep(0.02)
        total = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(total)
        me = {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "pid": os.getpid(),
            "env": {
                k: os.environ.get(k)
                for k in (
                    "RANK",
                    "LOCAL_RANK",
                    "SLURM_NODEID",
                    "MASTER_ADDR",
                    "GLOO_SOCKET_IFNAME",
                    "LIGHTDIST_TEST_HOST",
                )
            },
        }
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, me)
        return {"sum": total.item(), "ranks": everyone}


class Hosts:
    """Agents started as local processes; whatever is left is killed at the end."""

    def __init__(self, client_key: Path) -> None:
        self.client_key = client_key
        self.agents: dict[str, subprocess.Popen[str]] = {}

    def start(
        self,
        name: str,
        address: str,
        nproc: int = 2,
        env: dict[str, str] | None = None,
        key: Path | None = None,
        host_name: str | None = None,
    ) -> subprocess.Popen[str]:
        """Start an agent; ``name`` keys it here and is its ``--host-name`` unless ``host_name`` is given."""
        argv = [
            sys.executable,
            "-m",
            "lightdist.cli",
            "agent",
            "--connect",
            address,
            "--key-file",
            str(key or self.client_key),
            "--nproc-per-node",
            str(nproc),
            "--host-name",
            host_name or name,
            "--connect-timeout",
            "30",
        ]
        full_env = {**os.environ, **(env or {}), "LIGHTDIST_TEST_HOST": name}
        proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.agents[name] = proc
        return proc

    def tree(self, name: str) -> set[int]:
        proc = self.agents[name]
        return {proc.pid, *descendants(proc.pid)} if proc.poll() is None else set(descendants(proc.pid))

    def signal(self, name: str, sig: int) -> None:
        for pid in self.tree(name):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def output(self, name: str, timeout: float = 10.0) -> str:
        out, _ = self.agents[name].communicate(timeout=timeout)
        return out

    def close(self) -> None:
        for name, proc in self.agents.items():
            if proc.poll() is None:
                self.signal(name, signal.SIGCONT)
                self.signal(name, signal.SIGKILL)
            proc.communicate(timeout=10)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return create_pool_keys(tmp_path / "keys")


@pytest.fixture
def hosts(keys: tuple[Path, Path]) -> Iterator[Hosts]:
    h = Hosts(keys[1])
    try:
        yield h
    finally:
        h.close()


def runner(
    keys: tuple[Path, Path], nodes: int = 2, world_size: int = 4, **options: Any
) -> tuple[DistributedRunner, str]:
    address = f"tcp://127.0.0.1:{free_port()}"
    pool = DistributedRunner(
        Gather,
        world_size=world_size,
        nodes=nodes,
        listen=address,
        key_file=keys[0],
        accelerator="cpu",
        timeout=30,
        **options,
    )
    return pool, address


def two_hosts(keys: tuple[Path, Path], hosts: Hosts, **options: Any) -> tuple[DistributedRunner, str]:
    """A started pool on hosts a (ranks 0-1) and b (ranks 2-3)."""
    pool, address = runner(keys, **options)
    hosts.start("a", address, env={"SLURM_NODEID": "0"})
    hosts.start("b", address, env={"SLURM_NODEID": "1"})
    pool.start_sync(timeout=60)
    return pool, address


def test_two_hosts_form_one_pool_in_launcher_order(keys: tuple[Path, Path], hosts: Hosts) -> None:
    pool, address = runner(keys)
    # launcher variables are placement hints only: SLURM_NODEID=0 puts "b" first; the rest is scrubbed
    hosts.start("a", address, env={"SLURM_NODEID": "1", "RANK": "7", "MASTER_ADDR": "10.9.9.9"})
    hosts.start("b", address, env={"SLURM_NODEID": "0"})
    pool.start_sync(timeout=60)
    try:
        out = pool.invoke_sync({}, timeout=30)
        assert out["sum"] == 1 + 2 + 3 + 4
        by_rank = {r["rank"]: r for r in out["ranks"]}
        assert [by_rank[r]["env"]["LIGHTDIST_TEST_HOST"] for r in range(4)] == ["b", "b", "a", "a"]
        assert [by_rank[r]["local_rank"] for r in range(4)] == [0, 1, 0, 1]
        for rank, info in by_rank.items():
            assert info["env"]["RANK"] == str(rank) and info["env"]["LOCAL_RANK"] == str(info["local_rank"])
            assert info["env"]["SLURM_NODEID"] is None and info["env"]["MASTER_ADDR"] != "10.9.9.9"
            assert info["env"]["GLOO_SOCKET_IFNAME"] == "lo"  # the interface that reaches the driver
        again = pool.invoke_sync({}, timeout=30)
        assert {r["pid"] for r in again["ranks"]} == {r["pid"] for r in out["ranks"]}  # warm: same processes
    finally:
        pool.stop_sync()
    for name in ("a", "b"):
        assert hosts.agents[name].wait(timeout=10) == EXIT_STOPPED, hosts.output(name)


def test_a_hinted_agent_that_attaches_late_serves_and_a_hintless_one_is_the_spare(
    keys: tuple[Path, Path], hosts: Hosts, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import threading

    import lightdist._attach

    caplog.set_level(logging.INFO, logger="lightdist")
    monkeypatch.setattr(lightdist._attach, "HINT_GRACE_S", 30.0, raising=False)  # ample on a loaded machine
    pool, address = runner(keys)
    hosts.start("z", address)  # no launcher index: it serves only if a hinted host fails to come
    hosts.start("a", address, env={"NODE_RANK": "0"})
    failed: list[BaseException] = []
    starter = threading.Thread(target=lambda: _catch(failed, lambda: pool.start_sync(timeout=60)))
    starter.start()
    try:
        # two hosts are there, enough to form; the one with index 1 attaches after them
        assert wait_until(lambda: _can_form(pool, caplog, {"a", "z"}), 60)
        hosts.start("b", address, env={"NODE_RANK": "1"})
    finally:
        starter.join(timeout=90)
    try:
        assert not failed and pool.hosts == {"a": [0, 1], "b": [2, 3]}, failed
    finally:
        pool.stop_sync()
    assert hosts.agents["z"].wait(timeout=10) == EXIT_STOPPED  # the spare goes with the pool
    # Hinted hosts that never come hold their places for the grace only; then hint-less ones serve.
    monkeypatch.setattr(lightdist._attach, "HINT_GRACE_S", 1.0, raising=False)
    pool, address = runner(keys)
    hosts.start("y", address)
    hosts.start("c", address, env={"NODE_RANK": "0"})
    pool.start_sync(timeout=60)
    try:
        assert pool.hosts == {"c": [0, 1], "y": [2, 3]}
    finally:
        pool.stop_sync()


def _can_form(pool: DistributedRunner, caplog: pytest.LogCaptureFixture, names: set[str]) -> bool:
    """The driver's store is up and these hosts attached: enough to form the pool."""
    try:
        store = pool.stats().store_port
    except PoolClosedError:  # start() has not made the pool yet
        return False
    attached = {m.split()[1] for m in caplog.messages if m.startswith("host ") and " attached" in m}
    return store is not None and names <= attached


def _catch(errors: list[BaseException], run: Any) -> None:
    try:
        run()
    except BaseException as error:  # noqa: BLE001 - handed to the test's thread
        errors.append(error)


def test_start_names_the_attached_hosts_and_what_is_missing(
    keys: tuple[Path, Path], hosts: Hosts, capfd: pytest.CaptureFixture[str]
) -> None:
    pool, address = runner(keys)
    assert pool.address == address  # known before start: the command for the other hosts can be printed
    hosts.start("only", address)
    command = f"start 'lightdist agent --connect {address} --key-file {keys[1]} --nproc-per-node 2'"
    with pytest.raises(TimeoutError, match=r"1 of 2 hosts attached \(only\); " + re.escape(command)):
        pool.start_sync(timeout=4)
    # told to exit, nothing left running; 75: restart it for the next start()
    assert hosts.agents["only"].wait(timeout=LEASE_S + 5) == EXIT_RETRY
    assert "the pool failed: the pool's start did not complete" in hosts.output("only")
    # while it waited, the start said what for (once), with the command to run on the other hosts
    err = capfd.readouterr().err
    assert err.count("lightdist: waiting for ") == 1 and command in err, err
    port0 = DistributedRunner(Gather, world_size=2, nodes=1, listen="tcp://127.0.0.1:0", key_file=keys[0])
    assert port0.address is None  # port 0 is chosen when start() binds


def test_named_hosts_set_the_order_and_a_timeout_names_the_missing_one(keys: tuple[Path, Path], hosts: Hosts) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    pool = DistributedRunner(
        Gather, world_size=4, host_names=["a", "b"], listen=address, key_file=keys[0], accelerator="cpu"
    )
    hosts.start("b", address, env={"SLURM_NODEID": "0"})  # the hint loses to the names given
    with pytest.raises(TimeoutError, match=r"1 of 2 hosts attached \(b\); missing: a"):
        pool.start_sync(timeout=5)
    assert hosts.agents["b"].wait(timeout=LEASE_S + 5) == EXIT_RETRY
    hosts.start("b2", address)
    pool = DistributedRunner(
        Gather, world_size=4, host_names=["a", "b2"], listen=address, key_file=keys[0], accelerator="cpu"
    )
    hosts.start("a", address, env={"SLURM_NODEID": "1"})
    pool.start_sync(timeout=60)
    try:
        assert pool.hosts == {"a": [0, 1], "b2": [2, 3]}
    finally:
        pool.stop_sync()


def test_host_timeout_sets_how_fast_a_silent_host_is_lost(keys: tuple[Path, Path], hosts: Hosts) -> None:
    pool, address = two_hosts(keys, hosts, host_timeout=0.8)
    try:
        frozen_at = time.monotonic()
        hosts.signal("b", signal.SIGSTOP)
        assert wait_until(lambda: 2 not in pool.pids, 5.0)
        assert time.monotonic() - frozen_at < 0.8 + 0.7, "lost after host_timeout, not the 2 s default"
    finally:
        hosts.signal("b", signal.SIGCONT)
        pool.stop_sync()
    with pytest.raises(ValueError, match="host_timeout must be"):
        DistributedRunner(Gather, world_size=4, nodes=2, listen=address, key_file=keys[0], host_timeout=0)


def test_a_large_setup_argument_does_not_starve_the_heartbeat(keys: tuple[Path, Path], hosts: Hosts) -> None:
    # The bootstraps (with the setup kwargs) reach a template that reads them only after its
    # imports; they must not block the agent's loop past the driver's heartbeat timeout.
    pool, address = runner(keys)
    hosts.start("a", address)
    hosts.start("b", address)
    pool.start_sync(timeout=60, blob="x" * 400_000)
    try:
        assert pool.invoke_sync({}, timeout=30)["sum"] == 10
    finally:
        pool.stop_sync()


def test_hosts_of_different_sizes_are_refused(keys: tuple[Path, Path], hosts: Hosts) -> None:
    pool, address = runner(keys)
    hosts.start("a", address, nproc=1)
    hosts.start("b", address, nproc=3)
    with pytest.raises(ValueError, match=r"every host must run world_size / nodes = 2 ranks.*--nproc-per-node 2"):
        pool.start_sync(timeout=30)


def test_a_client_key_from_another_pool_is_refused(
    keys: tuple[Path, Path], hosts: Hosts, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool, address = runner(keys, nodes=1, world_size=2)
    _, stranger = create_pool_keys(tmp_path / "other-pool")
    hosts.start("intruder", address, key=stranger)
    with caplog.at_level(logging.WARNING, logger="lightdist"):
        forger = threading.Thread(target=_send_forged_frames, args=(address, keys[1]))
        forger.start()  # the pool's own client file (stolen, say) but frames signed with another key
        with pytest.raises(TimeoutError, match="0 of 1 hosts attached"):
            pool.start_sync(timeout=7)  # the agent gives up first: handshakes failing for 4 s (no reason given)
        forger.join(timeout=10)
    assert hosts.agents["intruder"].wait(timeout=10) == EXIT_REFUSED
    assert "cannot attach" in hosts.output("intruder")
    # the driver says so too: once per kind, although the agent knocked ten times a second for 4 s
    said = [r.getMessage() for r in caplog.records]
    refused = [line for line in said if "refused a connection" in line]
    assert len(refused) == 1, said
    assert f"refused a connection to {address}: CURVE decryption failed" in refused[0]
    assert "lightdist keys add-client" in refused[0]
    forged = [line for line in said if "not signed with the pool's key" in line]
    assert len(forged) == 1 and f"dropped a message on {address}" in forged[0], said


def _send_forged_frames(address: str, client_key: Path) -> None:
    from lightdist.keys import load_client_keys, secure_client
    from lightdist.protocol import Kind, Session

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock, load_client_keys(client_key))
        sock.connect(address)
        forger = Session(b"not the pool's key, 32 bytes....", "agent.forger", -2)
        for _ in range(4):
            sock.send_multipart(forger.pack(Kind.HELLO, 0, [b'{"nproc": 2}']))
        time.sleep(3.0)  # the driver binds its socket once start() runs; ZMQ delivers then
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_crashed_host_fails_the_call_naming_it_and_a_spare_takes_over(keys: tuple[Path, Path], hosts: Hosts) -> None:
    pool, address = two_hosts(keys, hosts)
    try:
        hosts.start("spare", address)  # attaches beyond the expected count: kept as a spare
        first = pool.invoke_sync({}, timeout=30)
        started = time.monotonic()
        crash_at = started + 1.0

        def crash() -> None:
            while time.monotonic() < crash_at:
                time.sleep(0.01)
            hosts.signal("b", signal.SIGKILL)

        import threading

        killer = threading.Thread(target=crash)
        killer.start()
        # Ranks 0-1 wait in the all-reduce for ranks 2-3: the crash closes their gloo connections
        # at once, and their "Connection closed by peer" must not pass for the cause.
        with pytest.raises(WorkerDiedError, match="host b was lost") as info:
            pool.invoke_sync({"sleep": 30.0, "sleepers": [2, 3]}, timeout=60)
        killer.join()
        detected = time.monotonic() - crash_at
        assert detected < HOST_TIMEOUT_S + 1.5, f"took {detected:.1f} s to report the lost host"
        assert info.value.rank in (2, 3) and isinstance(info.value, WorkerFailedError)
        # the pool re-forms on the spare: ranks 2-3 now run there, and the next call is correct
        out = pool.invoke_sync({}, timeout=60)
        assert out["sum"] == 10
        hosts_of = {r["rank"]: r["env"]["LIGHTDIST_TEST_HOST"] for r in out["ranks"]}
        assert hosts_of == {0: "a", 1: "a", 2: "spare", 3: "spare"}
        assert {r["pid"] for r in out["ranks"]}.isdisjoint({r["pid"] for r in first["ranks"] if r["rank"] >= 2})
    finally:
        pool.stop_sync()


def test_a_lost_host_without_a_spare_fails_calls_after_rehost_timeout_naming_it(
    keys: tuple[Path, Path], hosts: Hosts
) -> None:
    pool, address = two_hosts(keys, hosts, rehost_timeout=1.0)
    try:
        survivors = {rank: pid for rank, pid in pool.pids.items() if rank < 2}
        hosts.signal("b", signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: 2 not in pool.pids, HOST_TIMEOUT_S + 2)
        with pytest.raises(WorkerDiedError, match="host b was lost"):
            pool.invoke_sync({}, timeout=30)  # the loss while idle is reported to the next call
        missing = (
            r"host b \(ranks 2-3\) was lost: no heartbeat .* no other host attached within 1 s \(rehost_timeout\) "
            rf"to take its ranks: start 'lightdist agent --connect {address} --key-file \.\.\. --nproc-per-node 2' "
            r"on a host \(the pool resumes once it attached\), or call start\(\) again"
        )
        with pytest.raises(RuntimeError, match=missing):
            pool.invoke_sync({}, timeout=30)  # waits for a host, at most rehost_timeout after the loss
        assert time.monotonic() - killed < HOST_TIMEOUT_S + 1.0 + 1.5, "not bounded by rehost_timeout"
        asked = time.monotonic()
        with pytest.raises(RuntimeError, match=missing):
            pool.invoke_sync({}, timeout=30)
        assert time.monotonic() - asked < 0.5, "a later call fails at once"
        hosts.start("c", address)  # what the message says to do: the pool resumes, ranks 0-1 kept
        assert wait_until(lambda: pool.hosts.get("c") == [2, 3], 30)
        out = pool.invoke_sync({}, timeout=60)
        assert out["sum"] == 10 and {r["rank"]: r["pid"] for r in out["ranks"] if r["rank"] < 2} == survivors
        hosts.signal("c", signal.SIGKILL)  # lost again, and this time nobody comes
        with pytest.raises(WorkerFailedError, match="host c was lost"):
            pool.invoke_sync({"sleep": 30.0}, timeout=30)
        with pytest.raises(RuntimeError, match=r"host c \(ranks 2-3\) was lost: "):
            pool.invoke_sync({}, timeout=30)
    finally:
        pool.stop_sync()
    # the healthy host's agent says the pool failed, with a status that asks its launcher to restart it
    assert hosts.agents["a"].wait(timeout=10) == EXIT_RETRY
    assert "the pool failed: host c (ranks 2-3) was lost" in hosts.output("a")


def test_a_frozen_host_is_declared_lost_and_fenced_when_it_thaws(keys: tuple[Path, Path], hosts: Hosts) -> None:
    pool, address = two_hosts(keys, hosts)
    try:
        survivors = {rank: pid for rank, pid in pool.pids.items() if rank < 2}
        frozen = hosts.tree("b")
        hosts.signal("b", signal.SIGSTOP)
        assert wait_until(lambda: 2 not in pool.pids, HOST_TIMEOUT_S + 2), "the frozen host was never declared lost"
        hosts.start("spare", address)
        with pytest.raises(WorkerDiedError, match="host b was lost"):
            pool.invoke_sync({}, timeout=30)  # the call after an idle loss hears of it
        hosts.signal("b", signal.SIGCONT)  # healed: the agent learns it was fenced and takes its ranks down
        assert wait_until(lambda: not any(pid_alive(p) for p in frozen), LEASE_S + 5), "old ranks survived"
        assert hosts.agents["b"].wait(timeout=5) == EXIT_RETRY
        out = pool.invoke_sync({}, timeout=60)
        assert out["sum"] == 10 and {r["env"]["LIGHTDIST_TEST_HOST"] for r in out["ranks"]} == {"a", "spare"}
        # one recovery for the whole host: the survivors kept their processes (and their state)
        assert {r["rank"]: r["pid"] for r in out["ranks"] if r["rank"] < 2} == survivors
    finally:
        pool.stop_sync()


def test_a_dead_rank_on_a_healthy_host_is_respawned_there(keys: tuple[Path, Path], hosts: Hosts) -> None:
    pool, address = two_hosts(keys, hosts)
    try:
        before = pool.pids
        os.kill(before[3], signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="rank 3 was killed by SIGKILL: on host b"):
            pool.invoke_sync({"sleep": 30.0}, timeout=60)
        out = pool.invoke_sync({}, timeout=60)
        assert out["sum"] == 10
        after = {r["rank"]: r for r in out["ranks"]}
        assert after[3]["env"]["LIGHTDIST_TEST_HOST"] == "b" and after[3]["pid"] != before[3]
        assert after[3]["pid"] in hosts.tree("b"), "respawned by host b's own template"
        assert pool.hosts == {"a": [0, 1], "b": [2, 3]}
    finally:
        pool.stop_sync()


DRIVER = """
import sys, time
from lightdist import DistributedRunner
from tests.test_multihost import Gather
pool = DistributedRunner(Gather, world_size=2, nodes=1, listen=sys.argv[1], key_file=sys.argv[2], accelerator="cpu")
pool.start_sync(timeout=60)
print("ready", *pool.pids.values(), flush=True)
time.sleep(600)
"""


def test_a_killed_driver_takes_every_host_down_within_the_lease(keys: tuple[Path, Path], hosts: Hosts) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, address, str(keys[0])],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hosts.start("a", address)
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line.startswith("ready"), line
        ranks = [int(pid) for pid in line.split()[1:]]
        hosts.start("spare", address)  # a spare must go down with the driver too
        time.sleep(2.0)  # it attaches and gets its lease (and starts its template)
        tree = hosts.tree("a") | hosts.tree("spare")
        assert set(ranks) <= tree and hosts.agents["spare"].poll() is None
        driver.kill()
        killed = time.monotonic()
        assert wait_until(lambda: not any(pid_alive(p) for p in tree), LEASE_S + 2.0)
        assert time.monotonic() - killed <= LEASE_S + 1.0 + 0.5  # lease + 1 s, plus polling slack
        assert [hosts.agents[name].wait(timeout=5) for name in ("a", "spare")] == [EXIT_RETRY] * 2
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.communicate(timeout=10)


def test_worker_errors_name_the_worker_command(keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from lightdist.cli import main

    assert main(["worker", "--connect", "driver:29400", "--key-file", str(keys[1])]) == 2
    assert capsys.readouterr().err.startswith("lightdist worker: error: --connect 'driver:29400': expected tcp://")
    assert main(["worker", "--connect", "tcp://driver:29400", "--key-file", str(keys[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightdist worker: error: ") and "is a 'driver' key file" in err, err


class Big(DistributedWorker):
    """Rank 0 sends back the tensor it got, changed; the others return nothing."""

    def __call__(self, streaming: bool = False, x: Any = None) -> Any:
        return None if self.rank else x.add_(1)


@pytest.mark.parametrize("mib,host_timeout", [(256, 2.0), pytest.param(1024, 2.0, marks=pytest.mark.heavy)])
def test_a_large_tensor_across_hosts_does_not_starve_the_heartbeat(
    keys: tuple[Path, Path], hosts: Hosts, mib: int, host_timeout: float
) -> None:
    # Tensors cross hosts as signed frames of their own, to every rank and back from rank 0. Moving
    # them must not hold up the heartbeat: no host may be declared lost, no rank replaced.
    import torch

    address = f"tcp://127.0.0.1:{free_port()}"
    pool = DistributedRunner(
        Big, world_size=2, nodes=2, listen=address, key_file=keys[0], accelerator="cpu", host_timeout=host_timeout
    )
    hosts.start("a", address, nproc=1)
    hosts.start("b", address, nproc=1)
    pool.start_sync(timeout=60)
    try:
        pids = dict(pool.pids)
        x = torch.zeros(mib << 18)  # float32: mib MiB
        out = pool.invoke_sync({"x": x}, timeout=180)
        assert out.shape == x.shape and float(out[0]) == 1.0 and float(out[-1]) == 1.0
        assert float(x[0]) == 0.0  # the driver's tensor is its own
        assert pool.pids == pids, "a host was declared lost while the tensor moved"
        stats = pool.transfer_stats()
        assert stats["tensor_bytes_sent"] == x.nbytes and stats["tensor_bytes_received"] == x.nbytes
        assert pool.invoke_sync({"x": torch.ones(4)}, timeout=30).tolist() == [2.0] * 4
    finally:
        pool.stop_sync()
