"""Operating a pool across hosts (issue 17, items 2, 3 and 5): host names are identities, every
rank's output reaches the driver, bounded, and torchrun's restarts keep the layout.

Agents are real ``lightdist agent`` / ``lightdist worker`` processes on loopback, with CURVE, the
allow-list and HMAC signing on (see tests/test_multihost.py for the helpers).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lightdist import DistributedRunner, DistributedWorker, WorkerDiedError, WorkerError
from lightdist._identity import successors
from lightdist._recovery import MAX_RECOVERY_RESTARTS, Recovery
from tests import test_multihost
from tests.conftest import descendants, free_port, wait_until
from tests.test_multihost import Hosts

keys = test_multihost.keys  # the same fixtures: a pool's key files, and agents started as processes
hosts = test_multihost.hosts


class Ops(DistributedWorker):
    """Prints on both streams, all-reduces across hosts, and says where it runs."""

    def __call__(self, streaming: bool = False, say: str = "") -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        if say:
            print(f"{say} from rank {self.rank}", flush=True)
            print(f"{say} on stderr from rank {self.rank}", file=sys.stderr, flush=True)
        total = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(total)
        me = {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_rank": os.environ.get("NODE_RANK"),
            "local_rank": self.local_rank,
            "test_host": os.environ.get("LIGHTDIST_TEST_HOST"),
            "master_addr": os.environ.get("MASTER_ADDR"),
        }
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, me)
        return {"sum": total.item(), "ranks": everyone}


@dataclasses.dataclass
class _Spare:
    name: str
    nproc: int
    facts: dict[str, Any]


def test_lost_ranks_go_back_to_their_own_host_then_by_hint_then_in_arrival_order() -> None:
    # a torchrun restart: the new workers attach in any order, each named as the one it replaces
    lost = [([0], "n/0.0"), ([1], "n/0.1"), ([2], "n/1.0")]
    spares = [_Spare("n/1.0", 1, {}), _Spare("hot", 1, {}), _Spare("n/0.0", 1, {})]
    assert {i: s.name for i, s in successors(lost, spares)} == {0: "n/0.0", 2: "n/1.0", 1: "hot"}
    # agents: a spare whose launcher node index is the lost host's node, before earlier arrivals
    lost = [([2, 3], "b")]
    spares = [_Spare("x", 2, {"node_hint": 0}), _Spare("small", 1, {"node_hint": 1}), _Spare("y", 2, {"node_hint": 1})]
    assert [(i, s.name) for i, s in successors(lost, spares)] == [(0, "y")]
    assert successors([([0, 1], "a")], [_Spare("small", 1, {})]) == []  # no room: the ranks wait


def test_a_taken_host_name_is_refused_a_restarted_host_takes_its_place_and_ranks_print_at_the_driver(
    keys: tuple[Path, Path], hosts: Hosts, capfd: pytest.CaptureFixture[str]
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    # host_timeout 3 s: the restarted agent below attaches well before its crashed predecessor is lost
    pool = DistributedRunner(
        Ops, world_size=4, nodes=2, listen=address, key_file=keys[0], accelerator="cpu", timeout=30, host_timeout=3.0
    )
    # Two agents claim the name "same" (two agents on one machine with the default hostname):
    # one holds it, the other is refused with a message saying what to do; never merged.
    hosts.start("same-1", address, host_name="same", env={"SLURM_NODEID": "0"})
    hosts.start("same-2", address, host_name="same", env={"SLURM_NODEID": "0"})
    hosts.start("b", address, env={"SLURM_NODEID": "1"})
    pool.start_sync(timeout=90)
    try:
        assert pool.hosts == {"same": [0, 1], "b": [2, 3]}
        assert wait_until(lambda: any(hosts.agents[n].poll() is not None for n in ("same-1", "same-2")), 10)
        refused, holder = ("same-1", "same-2") if hosts.agents["same-1"].poll() is not None else ("same-2", "same-1")
        assert hosts.agents[refused].wait(timeout=5) == 2
        said = hosts.output(refused)
        assert "cannot attach to" in said and "host name 'same' is taken by a live agent" in said, said
        assert "give every agent its own --host-name" in said

        # Every rank's output reaches the driver, prefixed with its host and rank.
        printed = Printed(capfd)
        out = pool.invoke_sync({"say": "hello"}, timeout=30)
        assert out["sum"] == 10
        lines = [
            f"[{host} rank {r}] hello{how} from rank {r}\n"
            for r, host in enumerate(["same"] * 2 + ["b"] * 2)
            for how in ("", " on stderr")
        ]
        assert wait_until(lambda: all(printed.has(line) for line in lines), 10), printed.out + printed.err
        assert all((line in printed.err) == ("stderr" in line) for line in lines), "each stream stays itself"

        # The holder crashes; its launcher restarts it under the same name before the heartbeat
        # missed the old one: the newcomer waits, is admitted once the old one is lost, and gets
        # the old ranks back.
        hosts.signal(holder, signal.SIGKILL)
        hosts.start("same-3", address, host_name="same", env={"SLURM_NODEID": "0"})
        assert wait_until(lambda: 0 not in pool.pids, 10), "the crashed host was never declared lost"
        with pytest.raises(WorkerDiedError, match="host same was lost"):
            pool.invoke_sync({}, timeout=60)
        out = pool.invoke_sync({}, timeout=90)
        assert out["sum"] == 10 and pool.hosts == {"same": [0, 1], "b": [2, 3]}
        assert {r["test_host"] for r in out["ranks"] if r["rank"] < 2} == {"same-3"}
    finally:
        pool.stop_sync()
    # the agents' own lines: one when they attach, one when they get their ranks
    said = hosts.output("b")
    assert f"lightdist agent: attached to {address} as host 'b' (2 ranks)" in said, said
    assert "lightdist agent: host 'b' runs ranks 2-3 (node 1)" in said, said
    assert "hello from rank" not in said, "rank output stays off the agent's own stdout"


class Printed:
    """What the driver printed so far (``capfd`` hands out each part once)."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        capfd.readouterr()
        self.out = self.err = ""

    def has(self, text: str) -> bool:
        got = self.capfd.readouterr()
        self.out += got.out
        self.err += got.err
        return text in self.out + self.err


# --- rank output of another host when the driver's stdout is not read ------------------------------

FLOOD_DRIVER = """
import json, sys, time
from pathlib import Path
from lightdist import DistributedRunner, DistributedWorker

here, address, key_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def report(**fields):  # our stdout is the pipe nobody reads: results go to a file
    with (here / "report.jsonl").open("a") as f:
        f.write(json.dumps(fields) + "\\n")

class Chatty(DistributedWorker):
    def __call__(self, streaming=False, megabytes=0):
        for _ in range(megabytes * 1000):
            print("x" * 999)
        return "done"

runner = DistributedRunner(Chatty, world_size=1, nodes=1, listen=address, key_file=key_file, accelerator="cpu")
runner.start_sync(timeout=120)
pids = runner.pids
calls = []
for _ in range(3):
    started = time.monotonic()
    calls.append((runner.invoke_sync({"megabytes": 3}, timeout=30), time.monotonic() - started))
report(phase="chatty", calls=calls, same_ranks=runner.pids == pids, hosts=runner.hosts)
while not (here / "drained").exists():
    time.sleep(0.05)
started = time.monotonic()
runner.stop_sync(timeout=5)
report(phase="stopped", took=time.monotonic() - started)
"""


def test_another_hosts_flood_of_output_into_an_unread_driver_stdout_is_bounded(
    keys: tuple[Path, Path], hosts: Hosts, tmp_path: Path
) -> None:
    """A rank on an agent's host prints MBs while the driver's stdout is a pipe nobody reads: the
    calls return, the host is not declared lost (the heartbeat never waits on output), and once the
    pipe is read a notice says how much was dropped; what got through is prefixed with the host."""
    script = tmp_path / "driver.py"
    script.write_text(FLOOD_DRIVER)
    report = tmp_path / "report.jsonl"
    address = f"tcp://127.0.0.1:{free_port()}"
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        driver = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), address, str(keys[0])], stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        hosts.start("solo", address, nproc=1)
        assert wait_until(lambda: "chatty" in _reports(report) or driver.poll() is not None, 120, interval=0.1)
        chatty = _reports(report).get("chatty")
        assert chatty is not None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert chatty["same_ranks"] and chatty["hosts"] == {"solo": [0]}, chatty
        for value, took in chatty["calls"]:
            assert value == "done" and took < 10, (value, took)

        assert driver.stdout is not None
        seen = bytearray()

        def read_until_notice() -> None:
            deadline = time.monotonic() + 30
            while b"[lightdist] dropped " not in seen and time.monotonic() < deadline:
                chunk = os.read(driver.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]
                if not chunk:
                    return
                seen.extend(chunk)
            while b"\n" not in seen[seen.find(b"[lightdist] dropped ") :] and time.monotonic() < deadline:
                seen.extend(os.read(driver.stdout.fileno(), 1 << 16))  # type: ignore[union-attr]

        reader = threading.Thread(target=read_until_notice, daemon=True)
        reader.start()
        reader.join(timeout=35)
        assert seen.startswith(b"[solo rank 0] xxx"), bytes(seen[:200])
        at = seen.find(b"[lightdist] dropped ")
        assert at >= 0, bytes(seen[-300:])
        notice = seen[at:].split(b"\n", 1)[0].decode()
        assert int(notice.split()[2]) > 1 << 20, notice  # most of the ~9 MB printed was dropped
        (tmp_path / "drained").touch()
        assert wait_until(lambda: "stopped" in _reports(report) or driver.poll() is not None, 60, interval=0.1)
        assert _reports(report)["stopped"]["took"] < 5
        assert hosts.agents["solo"].wait(timeout=10) == 0
        driver.communicate(timeout=30)
        assert driver.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        driver.kill()
        driver.communicate(timeout=10)


def _reports(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return {r["phase"]: r for r in map(json.loads, path.read_text().splitlines())}


# --- torchrun: two nodes on this machine, one worker dies, torchrun restarts the node's workers -------


def _torchrun(node: int, address: str, rendezvous: int, client_key: Path) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{rendezvous}",
        "--rdzv-id",
        "ops",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.2",
        "-m",
        "lightdist.cli",
        "worker",
        "--connect",
        address,
        "--key-file",
        str(client_key),
        "--connect-timeout",
        "60",
    ]
    env = {**os.environ, "LIGHTDIST_TEST_HOST": f"node{node}"}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )


def _workers(torchrun: subprocess.Popen[str]) -> list[int]:
    """The `lightdist worker` processes torchrun started (not their templates or ranks)."""
    out = []
    for pid in descendants(torchrun.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lightdist.cli" in argv and b"worker" in argv:
            out.append(pid)
    return sorted(out)


def test_hosts_lost_during_recovery_never_use_up_its_restarts() -> None:
    # A torchrun restart of 2 nodes x 4 workers loses 8 one-rank hosts one after the other, each
    # while the pool recovers: that broke the pool ("ranks kept dying while it restarted them").
    recovery = Recovery(world_size=8, timeout=60.0)
    recovery.lost({0})
    assert recovery.begin() is not None
    for rank in range(1, 8):
        recovery.lost({rank})
        assert recovery.begin(again=True, counted=False) is not None
    for _ in range(MAX_RECOVERY_RESTARTS):  # ranks that die in setup still give up after the cap
        recovery.lost({0})
        assert recovery.begin(again=True) is not None
    recovery.lost({0})
    assert recovery.begin(again=True) is None


@pytest.mark.timeout(300)
def test_torchrun_workers_of_two_nodes_keep_their_ranks_across_a_restart(
    keys: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    pool = DistributedRunner(Ops, world_size=4, nodes=4, listen=address, key_file=keys[0], accelerator="cpu")
    rendezvous = free_port()
    nodes = [_torchrun(node, address, rendezvous, keys[1]) for node in range(2)]
    try:
        pool.start_sync(timeout=120)
        before = pool.invoke_sync({}, timeout=60)
        layout = {r["rank"]: (r["test_host"], r["local_rank"], r["node_rank"]) for r in before["ranks"]}
        # torchrun's RANK places each worker, LOCAL_RANK stays its own (its GPU), NODE_RANK is
        # torchrun's node index (GROUP_RANK), and two nodes on one machine are four hosts, not two
        assert [layout[r][1:] for r in range(4)] == [(0, "0"), (1, "0"), (0, "1"), (1, "1")], layout
        assert len({layout[r][0] for r in (0, 1)}) == 1 and layout[0][0] != layout[2][0], layout
        assert all(r["master_addr"] is None for r in before["ranks"]), "torchrun's variables are scrubbed"
        names = pool.hosts
        host = socket.gethostname()
        assert names == {f"{host}/0.0": [0], f"{host}/0.1": [1], f"{host}/1.0": [2], f"{host}/1.1": [3]}

        # One worker of one node dies; torchrun (--max-restarts 1) restarts the workers of both nodes.
        victim = nodes[0] if layout[0][0] == "node0" else nodes[1]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lightdist"):
            os.kill(_workers(victim)[0], signal.SIGKILL)
            after = None
            deadline = time.monotonic() + 180
            while after is None and time.monotonic() < deadline:
                try:
                    after = pool.invoke_sync({}, timeout=120)
                except (WorkerDiedError, WorkerError):
                    continue  # the calls that meet the restart fail; a later one runs on the new workers
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert after is not None and after["sum"] == 10
        assert pool.hosts == names, "every worker came back to its own rank"
        assert {r["rank"]: (r["test_host"], r["local_rank"], r["node_rank"]) for r in after["ranks"]} == layout
        assert {r["pid"] for r in after["ranks"]}.isdisjoint({r["pid"] for r in before["ranks"]})
        # one line per event (4 workers gone, the ranks waiting for them), never one per rank and retry
        assert len(warnings) <= 6 and len(set(warnings)) == len(warnings), warnings
    finally:
        pool.stop_sync()
        for torchrun in nodes:
            try:
                torchrun.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(torchrun.pid, signal.SIGKILL)
                torchrun.communicate(timeout=10)
