"""``pool``: start/stop per world size, invoke round trip and stream throughput, each beside a floor."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import zmq

from lightdist.bench.common import (
    CALL_TIMEOUT,
    START_TIMEOUT,
    WARMUP_CALLS,
    WARMUP_ITEMS,
    Row,
    format_table,
    machine,
    percentile,
    verdict,
)
from lightdist.runner import DistributedRunner
from lightdist.worker import DistributedWorker

# The floor's peer: a bare DEALER that echoes "ping" messages and answers "blast N" with N messages.
_ZMQ_PEER = r"""
import sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.linger = 0
sock.connect(sys.argv[1])
sock.send_multipart([b"hello", b""])
while True:
    frames = sock.recv_multipart()
    if frames[0] == b"ping":
        sock.send_multipart(frames)
    elif frames[0] == b"blast":
        for i in range(int(frames[1])):
            sock.send_multipart([b"item", i.to_bytes(8, "little")])
    else:
        break
sock.close()
ctx.term()
"""


class _BenchWorker(DistributedWorker):
    """Under ``invoke`` it does nothing and returns None: what is measured is the pool's overhead.

    Under ``stream``, rank 0 emits ``n`` small items as fast as it can.
    """

    def __call__(self, streaming: bool = False, n: int = 0, **kwargs: Any) -> None:
        if streaming and self.rank == 0:
            for i in range(n):
                self.add_streaming_result(i)
        return


# --- pool start / stop -----------------------------------------------------------------------------


def time_start_stop(world_size: int) -> tuple[float, float]:
    """Seconds for ``start_sync`` (all ranks READY) and then for ``stop_sync`` of one fresh pool."""
    runner = DistributedRunner(_BenchWorker, world_size=world_size, accelerator="cpu")
    try:
        t0 = time.perf_counter()
        runner.start_sync(timeout=START_TIMEOUT)
        started = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        runner.stop_sync()
        stopped = time.perf_counter() - t1
    return started, stopped


def time_import_torch() -> float:
    """Seconds for a fresh interpreter to start and ``import torch``: what any start must pay once."""
    t0 = time.perf_counter()
    # os._exit: skip interpreter finalization, which takes ~0.4 s once torch is loaded.
    subprocess.run([sys.executable, "-c", "import os, torch; os._exit(0)"], check=True, timeout=START_TIMEOUT)
    return time.perf_counter() - t0


def measure_start(world_sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    # The first pool of a process pays one-time costs: measured once, reported apart, kept out of
    # the medians. Sizes are interleaved so that drift in the machine's load hits all alike.
    cold_start, _ = time_start_stop(world_sizes[0])
    starts: dict[int, list[float]] = {ws: [] for ws in world_sizes}
    stops: dict[int, list[float]] = {ws: [] for ws in world_sizes}
    imports: list[float] = []
    for _ in range(repeats):
        imports.append(time_import_torch())
        for ws in world_sizes:
            started, stopped = time_start_stop(ws)
            starts[ws].append(started)
            stops[ws].append(stopped)
    return {"cold_start": cold_start, "import_torch": imports, "start": starts, "stop": stops}


# --- the bare ZMQ floor ----------------------------------------------------------------------------


class ZmqPeer:
    """A ROUTER here on a temporary ``ipc://`` path and a DEALER in a child interpreter."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="lightdist-bench-")
        address = f"ipc://{self._dir.name}/floor.sock"
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.rcvtimeo = int(CALL_TIMEOUT * 1000)  # every receive has a deadline
        self.sock.bind(address)
        self._child = subprocess.Popen([sys.executable, "-c", _ZMQ_PEER, address])
        self.identity = b""
        try:
            self.identity = self.recv()[0]
        except BaseException:
            self.close()
            raise

    def recv(self) -> list[bytes]:
        try:
            return self.sock.recv_multipart()
        except zmq.Again:
            raise TimeoutError(f"the bare ZMQ peer sent nothing for {CALL_TIMEOUT} s") from None

    def round_trips(self, calls: int) -> list[float]:
        out: list[float] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            self.sock.send_multipart([self.identity, b"ping", b"12345678"])
            self.recv()
            out.append(time.perf_counter() - t0)
        return out

    def one_way(self, n: int) -> float:
        """Seconds from asking the child for ``n`` messages to receiving the last one."""
        t0 = time.perf_counter()
        self.sock.send_multipart([self.identity, b"blast", str(n).encode()])
        for _ in range(n):
            self.recv()
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            if not self.identity:  # it never said hello: nothing to ask politely
                raise subprocess.TimeoutExpired("zmq peer", 0)
            self.sock.send_multipart([self.identity, b"exit", b""])
            self._child.wait(timeout=5)
        except (zmq.ZMQError, subprocess.TimeoutExpired):
            self._child.kill()
            self._child.wait(timeout=5)
        finally:
            self.sock.close()
            self._ctx.term()
            self._dir.cleanup()


# --- the pool's calls ------------------------------------------------------------------------------


def invoke_times(runner: DistributedRunner, calls: int) -> list[float]:
    """Seconds per no-op ``invoke_sync``."""
    out: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        runner.invoke_sync({}, timeout=CALL_TIMEOUT)
        out.append(time.perf_counter() - t0)
    return out


def stream_once(runner: DistributedRunner, n: int) -> dict[str, Any]:
    """One stream of ``n`` items: seconds from the call to the last item, count and order."""
    received: list[Any] = []
    t0 = time.perf_counter()
    t_last = t0
    for value in runner.stream_sync({"n": n}, timeout=CALL_TIMEOUT * 5):
        received.append(value)
        t_last = time.perf_counter()
    final = received.pop() if received else "missing"  # the last value is __call__'s result (None)
    return {
        "seconds": t_last - t0,
        "received": len(received),
        "in_order": received == list(range(len(received))) and final is None,
    }


def measure_calls(calls: int, items: int, repeats: int) -> dict[str, Any]:
    """Invoke and stream on a world-size-2 pool, each block next to the same block on bare ZMQ.

    Pool and floor alternate in blocks of 100 calls (and one stream per repeat), so a change in
    the machine's load (other jobs on a shared box) hits both sides of each ratio alike.
    """
    with contextlib.ExitStack() as stack:
        peer = ZmqPeer()
        stack.callback(peer.close)
        runner = DistributedRunner(_BenchWorker, world_size=2, accelerator="cpu")
        stack.callback(runner.stop_sync)
        runner.start_sync(timeout=START_TIMEOUT)
        peer.round_trips(WARMUP_CALLS)
        invoke_times(runner, WARMUP_CALLS)
        floor: list[float] = []
        invoke: list[float] = []
        for block in range(0, calls, 100):
            floor += peer.round_trips(min(100, calls - block))
            invoke += invoke_times(runner, min(100, calls - block))
        peer.one_way(WARMUP_ITEMS)
        stream_once(runner, WARMUP_ITEMS)
        one_way: list[float] = []
        streams: list[dict[str, Any]] = []
        for _ in range(repeats):
            one_way.append(peer.one_way(items))
            streams.append(stream_once(runner, items))
    return {"floor_rtt_s": floor, "invoke_s": invoke, "floor_one_way_s": one_way, "stream": streams}


def pool_rows(start: dict[str, Any], calls: dict[str, Any], items: int) -> list[Row]:
    ms = 1e3
    sizes = sorted(start["start"])
    base = statistics.median(start["start"][sizes[0]])
    imports = statistics.median(start["import_torch"])
    rows = [Row(f"pool start ws={sizes[0]}, first in process (s)", f"{start['cold_start']:.3f}")]
    for ws in sizes:
        med = statistics.median(start["start"][ws])
        row = Row(f"pool start ws={ws}, median (s)", f"{med:.3f}")
        if ws == sizes[0]:
            row.baseline, row.ratio = f"{imports:.3f} (import torch)", f"{med / imports:.2f}x"
        else:
            row.baseline, row.ratio = f"{base:.3f} (ws={sizes[0]})", f"{med / base:.2f}x"
            if ws == sizes[-1]:
                row.target, row.verdict = "<= 1.5x", verdict(med / base <= 1.5)
        rows.append(row)
    for ws in sizes:
        rows.append(Row(f"pool stop ws={ws}, median (s)", f"{statistics.median(start['stop'][ws]):.3f}"))
    for q in (50, 99):
        value, low = percentile(calls["invoke_s"], q) * ms, percentile(calls["floor_rtt_s"], q) * ms
        row = Row(f"invoke ws=2 p{q} (ms)", f"{value:.3f}", f"{low:.3f} (zmq rtt)", f"{value / low:.1f}x")
        if q == 50:
            row.target, row.verdict = "<= 2x", verdict(value / low <= 2.0)
        rows.append(row)
    streams = calls["stream"]
    rate = statistics.median(items / s["seconds"] for s in streams)
    floor_rate = statistics.median(items / s for s in calls["floor_one_way_s"])
    lost = sum(items - s["received"] for s in streams)
    ordered = all(s["in_order"] for s in streams)
    rows.append(
        Row(
            "stream ws=2 (items/s, median)",
            f"{rate:,.0f}",
            f"{floor_rate:,.0f} (zmq 1-way)",
            f"{rate / floor_rate:.2f}x",
            ">= 20,000/s",
            verdict(rate >= 20_000),
        )
    )
    rows.append(
        Row(
            f"stream items lost / {items * len(streams):,}",
            f"{lost}{'' if ordered else ', OUT OF ORDER'}",
            "-",
            "-",
            "0, in order",
            verdict(lost == 0 and ordered),
        )
    )
    return rows


def run_pool(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(
        f"lightdist.bench pool: {info['date']}, Python {info['python']}, torch {info['torch']}, "
        f"{info['cpus']} CPUs, load {info['loadavg']}",
        flush=True,
    )
    start = measure_start(args.world_sizes, args.repeats)
    calls = measure_calls(args.calls, args.items, args.repeats)
    print(format_table(pool_rows(start, calls, args.items)))
    return {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, "start": start, **calls}
