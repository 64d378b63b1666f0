"""Soak: one 2-rank pool serves 2,000 invokes and 200 streams while ranks are SIGKILLed and calls fail.

Every call must return exactly the right value (payload echo, an all-reduce over both ranks, stream
items in order) or raise a clean ``WorkerDiedError`` / ``WorkerError``, and every error must be
explained by a kill or a deliberate failure of that very call. Resources are measured in the driver
after warm-up and at the end (fds, threads, processes) and for each life of each rank (RSS): they
must not grow. Nothing here asserts a timing; run with ``-s`` to see the figures.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from lightdist import DistributedRunner, DistributedWorker, WorkerDiedError, WorkerError

from .conftest import descendants, wait_until

pytestmark = pytest.mark.slow

WARMUP = 100
INVOKES = 2_000
STREAMS = 200
ITEMS = 10
STREAM_EVERY = (INVOKES + STREAMS) // STREAMS  # call i is a stream when i % 11 == 10
FIRST, LAST = WARMUP, WARMUP + INVOKES + STREAMS  # the measured calls
# call index -> (rank to SIGKILL, when); every 500 calls, alternating ranks, twice from a timer.
KILLS = {500: (1, "before"), 1000: (0, "during"), 1500: (1, "during"), 2000: (0, "before")}
# call index -> rank 1 raises before the collective (rank 0 then hangs in all_reduce: killed after
# the grace period) or after it (nobody is stuck: no recovery).
FAILS = {700: "after", 1400: "before", 2100: "after"}
GRACE = 0.5
CALL_TIMEOUT = 30.0  # seconds; generous for a loaded 2-core machine, but a hang still ends
HOLD = 5.0  # a held call waits this long (polling `cancelled`) for the kill that fails it
KILL_AFTER = 0.3  # seconds after a held call is submitted, its timer kills a rank
RSS_EVERY = 100
FD_SLACK = 5
THREAD_SLACK = 5
RSS_SLACK_MB = 50.0


class SoakWorker(DistributedWorker):
    """Echoes its payload after an all-reduce over both ranks; holds, streams or raises on demand."""

    def setup(self, tag: str = "") -> None:
        self.tag = tag  # a respawned rank gets it again from the original start() kwargs

    def __call__(
        self, streaming: bool = False, x: int = 0, n: int = 0, hold: float = 0.0, fail: str = ""
    ) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        if self.rank == 1 and fail == "before":
            raise ValueError(f"deliberate failure before the collective, x={x}")
        total = torch.tensor([x * (self.rank + 1)], dtype=torch.int64)
        dist.all_reduce(total)  # the group must be whole again after every recovery
        if streaming and self.rank == 0:
            for i in range(n):
                self.add_streaming_result([x, i])
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and not self.cancelled:
            time.sleep(0.01)
        if self.rank == 1 and fail == "after":
            raise ValueError(f"deliberate failure after the collective, x={x}")
        return {"x": x, "sum": int(total.item()), "tag": self.tag, "pid": os.getpid()}


@dataclass
class Tally:
    ok: int = 0
    errors: dict[int, tuple[str, int, str]] = field(default_factory=dict)  # call -> (type, rank, first line)
    causes: dict[int, str] = field(default_factory=dict)  # call index -> why an error may follow
    rss_kb: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (rank, pid) -> samples


def run_call(runner: DistributedRunner, index: int, tally: Tally, payload: dict[str, Any]) -> None:
    """One call: a checked value, or a clean error recorded under its index."""
    items: list[Any] = []
    try:
        if index % STREAM_EVERY == STREAM_EVERY - 1:
            for value in runner.stream_sync({"x": index, "n": ITEMS, **payload}, timeout=CALL_TIMEOUT):
                items.append(value)
            final = items.pop()
            assert items == [[index, i] for i in range(ITEMS)], (index, items)
        else:
            final = runner.invoke_sync({"x": index, **payload}, timeout=CALL_TIMEOUT)
        rank0 = runner.pids.get(0)
        # sum: x from rank 0 plus 2x from rank 1; pid: the value came from the live rank 0
        assert final == {"x": index, "sum": 3 * index, "tag": "soak", "pid": rank0}, (index, final)
        tally.ok += 1
    except WorkerDiedError as exc:
        assert exc.signal == 9 and exc.exitcode is None, exc
        tally.errors[index] = ("WorkerDiedError", exc.rank, str(exc))
    except WorkerError as exc:
        tally.errors[index] = ("WorkerError", exc.rank, f"{exc.exc_type}: {exc.message.splitlines()[0]}")
    assert items == [[index, i] for i in range(len(items))], (index, items)  # never a foreign item


def explained(index: int, error: tuple[str, int, str]) -> bool:
    """Whether ``error`` is what call ``index`` may raise: the killed rank's death, or rank 1's
    deliberate exception."""
    kind, rank, message = error
    if index in FAILS:
        return (kind, rank) == ("WorkerError", 1) and message.startswith("ValueError: deliberate failure")
    if index not in KILLS:
        return False
    killed, _ = KILLS[index]
    # Always the death itself, never the survivor's gloo "connection reset" echo of it: the pool
    # holds a collective's error briefly in case a death explains it (HOLD_COLLECTIVE_ERROR_S).
    return (kind, rank) == ("WorkerDiedError", killed)


def live_pids(runner: DistributedRunner) -> dict[int, int]:
    assert wait_until(lambda: len(runner.pids) == 2, 10.0), runner.pids
    return runner.pids


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmRSS")


def sample_rss(runner: DistributedRunner, tally: Tally) -> None:
    for rank, pid in live_pids(runner).items():
        tally.rss_kb.setdefault((rank, pid), []).append(rss_kb(pid))


def checkpoint(runner: DistributedRunner, label: str) -> dict[str, Any]:
    """Driver fds and threads, and the process tree: exactly the template and two ranks."""
    template = runner.stats().template_pid
    assert template is not None
    expected = {template, *live_pids(runner).values()}
    wait_until(lambda: descendants() == expected, 10.0)  # a killed rank is reaped within moments
    fig = {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "procs": len(descendants()),
        "rank_rss_mb": {r: round(rss_kb(p) / 1024, 1) for r, p in sorted(runner.pids.items())},
        "recoveries": runner.stats().recoveries,
    }
    print(f"[soak] {label}: {fig}", flush=True)
    assert descendants() == expected, (descendants(), expected)
    return fig


def plan(index: int, runner: DistributedRunner, tally: Tally, timers: list[threading.Timer]) -> dict[str, Any]:
    """Kill a rank or arm a deliberate failure when ``index`` asks for it; the call's extra payload."""
    if index in KILLS:
        rank, when = KILLS[index]
        pid = live_pids(runner)[rank]
        tally.causes[index] = f"rank {rank} (pid {pid}) SIGKILLed {when} the call"
        if when == "before":  # while idle: this call is the one told about it
            os.kill(pid, 9)
            return {}
        timer = threading.Timer(KILL_AFTER, os.kill, (pid, 9))
        timer.start()
        timers.append(timer)
        return {"hold": HOLD}  # only the kill (then CANCEL to the survivor) ends this call early
    if index in FAILS:
        tally.causes[index] = f"rank 1 raises {FAILS[index]} the collective"
        return {"fail": FAILS[index]}
    return {}


def test_soak_kills_and_failures_leave_no_trace() -> None:
    runner = DistributedRunner(SoakWorker, world_size=2, accelerator="cpu", grace_period=GRACE)
    tally = Tally()
    timers: list[threading.Timer] = []
    t0 = time.monotonic()
    try:
        runner.start_sync(timeout=120, tag="soak")
        for index in range(FIRST):
            run_call(runner, index, tally, {})
        warm = checkpoint(runner, f"after {FIRST} warm-up calls")
        for index in range(FIRST, LAST):
            if index % RSS_EVERY == 0:
                sample_rss(runner, tally)  # before any kill at this index: a life's samples are its own
            run_call(runner, index, tally, plan(index, runner, tally, timers))
        for timer in timers:
            timer.join(timeout=10)
        sample_rss(runner, tally)
        end = checkpoint(runner, f"after {LAST - FIRST} more calls")
    finally:
        for timer in timers:
            timer.cancel()
        runner.stop_sync()

    died = sum(kind == "WorkerDiedError" for kind, _, _ in tally.errors.values())
    print(
        f"[soak] {tally.ok} calls ok, {died} WorkerDiedError, {len(tally.errors) - died} WorkerError, "
        f"{len(KILLS)} kills, {LAST} calls in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    for index, (kind, rank, message) in sorted(tally.errors.items()):
        print(f"[soak]   call {index}: {kind} rank {rank}: {message[:90]}  <- {tally.causes.get(index, 'UNEXPLAINED')}")
    growth = {f"rank {r} pid {p}": round((s[-1] - s[0]) / 1024, 1) for (r, p), s in tally.rss_kb.items()}
    print(f"[soak] rank RSS growth per life, first to last sample (MB): {growth}", flush=True)
    spans = {f"rank {r} pid {p}": len(s) for (r, p), s in tally.rss_kb.items()}
    print(f"[soak] samples per life (every {RSS_EVERY} calls): {spans}", flush=True)

    # Each kill or deliberate failure failed exactly its own call, with the right error; nothing
    # else failed.
    assert sorted(tally.errors) == sorted(tally.causes), (tally.errors, tally.causes)
    assert all(explained(i, e) for i, e in tally.errors.items()), tally.errors
    assert tally.ok == LAST - len(tally.causes)
    # One recovery per kill and one for the rank stuck in all_reduce; none for a failure after it.
    assert end["recoveries"] - warm["recoveries"] == len(KILLS) + 1, (warm, end)
    assert end["fds"] - warm["fds"] <= FD_SLACK, (warm, end)
    assert end["threads"] - warm["threads"] <= THREAD_SLACK, (warm, end)
    assert warm["procs"] == end["procs"] == 3, (warm, end)
    lives = [s for s in tally.rss_kb.values() if len(s) >= 4]  # lives that ran >= 300 calls
    assert len(lives) >= 4, spans
    assert max((s[-1] - s[0]) / 1024 for s in tally.rss_kb.values()) < RSS_SLACK_MB, growth
