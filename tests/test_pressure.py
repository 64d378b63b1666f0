"""Reliability under pressure (issue 12): bounded memory with backpressure, capped untrusted bytes,
stop during start, an unguessable store prefix, heartbeats during large payloads. Real pools, real
sockets, real processes; every wait has a deadline."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lightdist import DistributedRunner, DistributedWorker, PoolClosedError, WorkerDiedError, WorkerError


class Slow(DistributedWorker):
    def setup(self, delay: float = 0.0) -> None:
        time.sleep(delay)

    def __call__(self, streaming: bool = False) -> str:
        return "ok"


# --- stop() during start() ------------------------------------------------------------------------


def test_stop_during_start_ends_the_start_at_once_with_pool_closed() -> None:
    runner = DistributedRunner(Slow, world_size=2)
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            runner.start_sync(timeout=120, delay=30.0)  # setup would take 30 s
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    deadline = time.monotonic() + 30
    while runner._pool is None and time.monotonic() < deadline:  # the pool exists: start() is waiting
        time.sleep(0.05)
    time.sleep(0.5)
    stopped = time.monotonic()
    runner.stop_sync(timeout=2)
    starter.join(timeout=10)
    assert not starter.is_alive(), "start() kept waiting after stop()"
    assert time.monotonic() - stopped < 10
    assert len(outcome) == 1 and isinstance(outcome[0], PoolClosedError), outcome
    runner.stop_sync()  # idempotent, and no ZMQError from a closed socket
    assert not runner.is_alive()
    runner.start_sync(timeout=120)  # the runner can start again afterwards
    try:
        assert runner.invoke_sync(timeout=30) == "ok"
    finally:
        runner.stop_sync()


# --- the rendezvous store ---------------------------------------------------------------------------


def test_store_keys_are_under_a_prefix_nobody_else_can_guess() -> None:
    """A local client of the unauthenticated TCPStore that knows the old scheme (`pg<generation>`)
    finds none of the group's keys and cannot plant keys the next generation will read."""
    import datetime
    import os
    import signal

    import torch.distributed as dist

    from lightdist._recovery import store_prefix

    a, b = store_prefix(1), store_prefix(1)
    assert a != b and a.startswith("pg1.") and len(a.split(".", 1)[1]) == 32  # 128 random bits

    runner = DistributedRunner(Slow, world_size=2)
    runner.start_sync(timeout=120)
    try:
        port = runner.stats().store_port
        assert port is not None
        intruder = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
        guesses = [f"pg{g}/{k}" for g in range(3) for k in ("0", "1", "rank_0", "rank_1", "/0", "/1")]
        assert not intruder.check(guesses), "the group's keys are under a guessable name"
        for g in range(1, 4):  # plant junk where the next generations would have looked
            for key in ("0", "1", "rank_0", "rank_1"):
                intruder.set(f"pg{g}/{key}", b"\xff" * 64)
        os.kill(runner.pids[1], signal.SIGKILL)  # recovery builds generation 1
        deadline = time.monotonic() + 30
        while runner.stats().recoveries < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(WorkerDiedError):  # the idle death is reported to this call
            runner.invoke_sync(timeout=30)
        assert runner.invoke_sync(timeout=30) == "ok"
        assert runner.stats().state == "ready"
    finally:
        runner.stop_sync()


# --- untrusted bytes are capped -------------------------------------------------------------------


class Big(DistributedWorker):
    def __call__(self, streaming: bool = False, n: int = 0, stream: bool = False) -> object:
        if stream and self.rank == 0:
            self.add_streaming_result(b"x" * n)
        return b"y" * n if self.rank == 0 and not stream else "ok"


_ATTACKER = """
import sys, time, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 2000)
sock.connect(sys.argv[1])
blob = b"\\0" * (300 << 20)
for _ in range(3):
    sock.send_multipart([b"junk", blob, blob])
time.sleep(3)
sock.close()
ctx.term()
"""


def _peak_rss_mb() -> float:
    """This process's peak RSS since the last :func:`_reset_peak` (freed buffers still count)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS


def test_a_tcp_channel_without_curve_warns_and_refuses_oversized_frames(tmp_path: Path) -> None:
    """Anyone can reach a TCP command channel without CURVE: the driver warns, and a client sending
    300 MB frames is disconnected before they are read (the driver's memory does not grow by them)."""
    import socket as socketlib

    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runner = DistributedRunner(Big, world_size=2, worker_port=port)
    with pytest.warns(RuntimeWarning, match="without CURVE"):
        runner.start_sync(timeout=120)
    try:
        _reset_peak()
        before = _peak_rss_mb()
        script = tmp_path / "attacker.py"
        script.write_text(_ATTACKER)
        attack = subprocess.run([sys.executable, str(script), runner.address or ""], timeout=60, capture_output=True)
        assert attack.returncode == 0, attack.stderr
        grown = _peak_rss_mb() - before
        assert grown < 200, f"the driver buffered the attacker's frames: peak RSS +{grown:.0f} MB"
        assert runner.invoke_sync({"n": 10}, timeout=30) == b"y" * 10
    finally:
        runner.stop_sync()


def test_a_result_or_item_over_the_frame_limit_is_an_error_not_a_hang() -> None:
    runner = DistributedRunner(Big, world_size=2, max_frame_bytes=1 << 16)
    runner.start_sync(timeout=120)
    try:
        with pytest.raises(WorkerError, match="max_frame_bytes"):
            runner.invoke_sync({"n": 1 << 17}, timeout=30)
        with pytest.raises(WorkerError, match="max_frame_bytes"):
            list(runner.stream_sync({"n": 1 << 17, "stream": True}, timeout=30))
        assert runner.invoke_sync({"n": 1000}, timeout=30) == b"y" * 1000  # still serving, nothing killed
        assert runner.stats().recoveries == 0
    finally:
        runner.stop_sync()


# --- streams have backpressure ----------------------------------------------------------------------


class Firehose(DistributedWorker):
    def __call__(self, streaming: bool = False, n: int = 0, size: int = 1 << 20) -> int:
        if self.rank == 0:
            for i in range(n):
                self.add_streaming_result(i.to_bytes(8, "little") + b"\0" * size)
        return n


def test_a_slow_consumer_slows_the_producer_and_loses_nothing() -> None:
    """Rank 0 streams 1 MB items as fast as it can; the consumer reads one every 20 ms. The driver
    holds at most the stream window (here 8 MiB) of unread items, not the whole stream, and every
    item arrives, in order."""
    runner = DistributedRunner(Firehose, world_size=2, stream_buffer_bytes=8 << 20)
    runner.start_sync(timeout=120)
    try:
        n = 300  # 300 MB in all
        _reset_peak()
        before = _peak_rss_mb()
        seen = []
        for item in runner.stream_sync({"n": n}, timeout=120):
            if isinstance(item, bytes):
                seen.append(int.from_bytes(item[:8], "little"))
                time.sleep(0.02)
            else:
                assert item == n  # the final result
        grown = _peak_rss_mb() - before
        assert seen == list(range(n)), "items lost or out of order"
        assert grown < 100, f"the driver buffered the stream: peak RSS +{grown:.0f} MB"
    finally:
        runner.stop_sync()


def test_a_cancelled_stream_unblocks_a_producer_waiting_for_room() -> None:
    runner = DistributedRunner(Firehose, world_size=2, stream_buffer_items=4)
    runner.start_sync(timeout=120)
    try:
        stream = runner.stream_sync({"n": 10_000, "size": 10}, timeout=60)
        assert int.from_bytes(next(stream)[:8], "little") == 0
        time.sleep(0.3)  # rank 0 now waits for credit
        stream.close()  # leaving the stream cancels the call
        assert runner.invoke_sync({"n": 0}, timeout=30) == 0  # the producer gave up: the pool is free
        assert runner.stats().recoveries == 0
    finally:
        runner.stop_sync()


# --- everything at once, for a bounded time -----------------------------------------------------------


class Mixed(DistributedWorker):
    def __call__(self, streaming: bool = False, n: int = 0, size: int = 0, x: Any = None, hold: float = 0.0) -> Any:
        import torch
        import torch.distributed as dist

        total = torch.ones(1)
        dist.all_reduce(total)
        if streaming and self.rank == 0:
            for i in range(n):
                self.add_streaming_result(i.to_bytes(8, "little") + b"\0" * size)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and not self.cancelled:
            time.sleep(0.01)
        return None if x is None else float(x.sum()) + total.item()


@pytest.mark.heavy
def test_pressure_soak_slow_consumers_big_payloads_and_kills() -> None:
    """60 s of slow stream consumers, 64 MB payloads and SIGKILLed ranks on one pool: every call
    returns the right value or a WorkerDiedError explained by a kill; the driver's fds, threads and
    processes end where they started and its RSS stays flat. Run with --run-heavy -s for figures."""
    import os
    import signal

    import torch

    from tests.conftest import descendants

    runner = DistributedRunner(Mixed, world_size=2, stream_buffer_bytes=8 << 20, grace_period=0.5)
    runner.start_sync(timeout=120)
    try:
        for _ in range(5):
            runner.invoke_sync({"x": torch.ones(10)}, timeout=60)

        def snapshot() -> dict[str, Any]:
            time.sleep(1.0)  # a killed rank is reaped and respawned within moments
            return {
                "fds": len(os.listdir("/proc/self/fd")),
                "threads": threading.active_count(),
                "procs": len(descendants()),
                "rss_mb": round(_peak_rss_mb(), 1),
            }

        _reset_peak()
        warm = snapshot()
        ended = time.monotonic() + 60
        rounds = kills = died = 0
        while time.monotonic() < ended:
            rounds += 1
            killer = None
            if rounds % 5 == 0:
                victim = runner.pids[rounds % 2]
                killer = threading.Timer(0.2, os.kill, (victim, signal.SIGKILL))
                killer.start()
                kills += 1
            try:
                got = []
                for item in runner.stream_sync({"n": 40, "size": 1 << 20, "hold": 0.3}, timeout=60):
                    if isinstance(item, bytes):
                        got.append(int.from_bytes(item[:8], "little"))
                        time.sleep(0.005)  # a slow consumer
                assert got == list(range(40))
                x = torch.ones(16 << 20)  # 64 MB
                assert runner.invoke_sync({"x": x}, timeout=60) == float(x.numel()) + 2.0
            except WorkerDiedError:
                died += 1
                assert killer is not None, "a death nobody caused"
            finally:
                if killer is not None:
                    killer.join(timeout=5)
        _reset_peak()
        end = snapshot()
        print(f"[pressure soak] {rounds} rounds, {kills} kills, {died} WorkerDiedError; warm {warm}, end {end}")
        assert died <= kills
        assert end["fds"] - warm["fds"] <= 5 and end["threads"] - warm["threads"] <= 3, (warm, end)
        assert end["procs"] == warm["procs"] == 3, (warm, end)
        assert end["rss_mb"] - warm["rss_mb"] < 150, (warm, end)
    finally:
        runner.stop_sync()
