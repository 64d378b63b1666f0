"""Streaming on a real 2-rank gloo pool: order, isolation between calls, threads, timeouts, cancel.

One module-scoped pool of :class:`Streamer` serves every test here (a pool start costs seconds).
Each call names a ``mode``; the worker keeps per-token notes (did it see ``cancelled``? what did a
late thread get?) that a later ``invoke`` reads back, so worker-side facts are checked for real.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lightdist import DistributedRunner, DistributedWorker, WorkerError
from tests.conftest import wait_until

CALL_TIMEOUT = 60.0  # a bound on every call, far above what any call here needs
WORKER_LIMIT = 60.0  # the longest a worker loop waits for `cancelled` before giving up


class Streamer(DistributedWorker):
    """Dispatches on ``mode`` to one of the ``_mode_*`` methods below."""

    def setup(self, **kwargs: Any) -> None:
        self.saw_cancel: dict[str, bool] = {}
        self.late_errors: dict[str, str] = {}

    def __call__(self, mode: str, streaming: bool = False, **kwargs: Any) -> Any:
        return getattr(self, f"_mode_{mode}")(**kwargs)

    def _mode_count(self, n: int, pad: int = 0) -> dict[str, int]:
        if self.rank == 0:
            for i in range(n):
                self.add_streaming_result((i, "x" * pad) if pad else i)
        return {"done": n}

    def _mode_tagged(self, token: str, n: int) -> dict[str, Any]:
        if self.rank == 0:
            for i in range(n):
                self.add_streaming_result({"token": token, "i": i})
        return {"token": token, "final": True}

    def _mode_threads(self, n: int) -> list[bool]:
        """Two helper threads and the main thread emit ``(name, i)`` concurrently."""
        if self.rank != 0:
            return []

        def emit(name: str) -> None:
            for i in range(n):
                self.add_streaming_result((name, i))

        threads = [threading.Thread(target=emit, args=(f"t{k}",)) for k in range(2)]
        for thread in threads:
            thread.start()
        emit("main")
        for thread in threads:
            thread.join(timeout=WORKER_LIMIT)
        return [thread.is_alive() for thread in threads]

    def _mode_both_ranks(self, n: int) -> list[list[str]]:
        """Every rank emits; returns each rank's warnings, gathered on rank 0."""
        import torch.distributed as dist

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(n):
                self.add_streaming_result({"rank": self.rank, "i": i})
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, [str(w.message) for w in caught])
        return gathered

    def _mode_stall(self, token: str) -> str:
        """One item, then nothing until cancelled."""
        if self.rank == 0:
            self.add_streaming_result("first")
        self.saw_cancel[token] = self._wait_cancelled()
        return "stalled"

    def _mode_drip(self, token: str, every: float) -> str:
        """An item every ``every`` seconds until cancelled."""
        deadline = time.monotonic() + WORKER_LIMIT
        i = 0
        while not self.cancelled and time.monotonic() < deadline:
            if self.rank == 0:
                self.add_streaming_result(i)
                i += 1
            time.sleep(every)
        self.saw_cancel[token] = self.cancelled
        return "dripped"

    def _mode_saw_cancel(self, token: str) -> bool | None:
        return self.saw_cancel.get(token)

    def _mode_late_thread(self, token: str) -> None:
        """Start a thread that outlives this call and calls add_streaming_result once it is over."""
        if self.rank == 0:
            threading.Thread(target=self._late_emitter, args=(token,), daemon=True).start()

    def _late_emitter(self, token: str) -> None:
        deadline = time.monotonic() + WORKER_LIMIT
        while time.monotonic() < deadline:
            try:
                self.add_streaming_result("late")  # silently ignored while the (invoke) call runs
            except RuntimeError as exc:
                self.late_errors[token] = str(exc)
                return
            time.sleep(0.001)
        self.late_errors[token] = "add_streaming_result() never raised outside a call"

    def _mode_late_error(self, token: str) -> str | None:
        return self.late_errors.get(token)

    def _wait_cancelled(self) -> bool:
        deadline = time.monotonic() + WORKER_LIMIT
        while not self.cancelled and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.cancelled


class StreamsInSetup(DistributedWorker):
    def setup(self, **kwargs: Any) -> None:
        self.add_streaming_result("too early")


@pytest.fixture(scope="module")
def pool() -> Iterator[DistributedRunner]:
    runner = DistributedRunner(Streamer, world_size=2)
    runner.start_sync(timeout=120)
    yield runner
    runner.stop_sync()


def drain(runner: DistributedRunner, payload: dict[str, Any], how: str, into: list[Any], **kwargs: Any) -> None:
    """Append every item of one stream to ``into``, through ``stream_sync`` or async ``stream``."""
    kwargs.setdefault("timeout", CALL_TIMEOUT)
    if how == "sync":
        for item in runner.stream_sync(payload, **kwargs):
            into.append(item)
        return

    async def consume() -> None:
        async for item in runner.stream(payload, **kwargs):
            into.append(item)

    asyncio.run(consume())


def collect(runner: DistributedRunner, payload: dict[str, Any], how: str, **kwargs: Any) -> list[Any]:
    items: list[Any] = []
    drain(runner, payload, how, items, **kwargs)
    return items


def assert_serves(runner: DistributedRunner) -> None:
    assert runner.invoke_sync({"mode": "count", "n": 0}, timeout=CALL_TIMEOUT) == {"done": 0}
    assert collect(runner, {"mode": "count", "n": 3}, "sync") == [0, 1, 2, {"done": 3}]


HOW = pytest.mark.parametrize("how", ["sync", "async"])


# --- (a) order and completeness ------------------------------------------------------------------


@HOW
def test_ten_thousand_items_arrive_in_order_then_result(pool: DistributedRunner, how: str) -> None:
    """A burst of 10,000 items loses, duplicates and reorders nothing; the final result comes last."""
    items = collect(pool, {"mode": "count", "n": 10_000}, how)
    assert items[:-1] == list(range(10_000))
    assert items[-1] == {"done": 10_000}


# --- (b) isolation between calls ------------------------------------------------------------------


def _run_one(runner: DistributedRunner, k: int) -> tuple[str, Any]:
    token = f"call-{k}"
    payload = {"mode": "tagged", "token": token, "n": 20 + k}
    if k % 2:
        return token, runner.invoke_sync(payload, timeout=CALL_TIMEOUT)
    return token, collect(runner, payload, "sync")


async def _run_one_async(runner: DistributedRunner, k: int) -> tuple[str, Any]:
    token = f"call-{k}"
    payload = {"mode": "tagged", "token": token, "n": 20 + k}
    if k % 2:
        return token, await runner.invoke(payload, timeout=CALL_TIMEOUT)
    return token, [item async for item in runner.stream(payload, timeout=CALL_TIMEOUT)]


def _check_isolated(results: list[tuple[str, Any]]) -> None:
    assert len(results) == 30
    for k, (token, got) in enumerate(results):
        final = {"token": token, "final": True}
        if k % 2:
            assert got == final, f"invoke {token} returned {got!r}"
        else:
            assert got == [{"token": token, "i": i} for i in range(20 + k)] + [final], f"stream {token} mixed up"


def test_sequential_invoke_and_stream_never_mix(pool: DistributedRunner) -> None:
    """30 alternating invoke/stream calls (invokes emit items too): each gets only its own data."""
    _check_isolated([_run_one(pool, k) for k in range(30)])


def test_concurrent_threads_invoke_and_stream_never_mix(pool: DistributedRunner) -> None:
    """30 calls queued at once from 6 threads: no item or result is routed to another call."""
    with ThreadPoolExecutor(max_workers=6) as executor:
        futures = [executor.submit(_run_one, pool, k) for k in range(30)]
        _check_isolated([f.result(timeout=4 * CALL_TIMEOUT) for f in futures])


def test_concurrent_tasks_invoke_and_stream_never_mix(pool: DistributedRunner) -> None:
    """30 coroutines on one event loop queued at once: same isolation through the async API."""

    async def main() -> list[tuple[str, Any]]:
        gathered = asyncio.gather(*(_run_one_async(pool, k) for k in range(30)))
        return await asyncio.wait_for(gathered, 4 * CALL_TIMEOUT)

    _check_isolated(asyncio.run(main()))


def test_invoke_drops_items_and_next_stream_has_no_leftovers(pool: DistributedRunner) -> None:
    """Items emitted during invoke are not returned and do not leak into the following stream."""
    first = pool.invoke_sync({"mode": "tagged", "token": "A", "n": 2_000}, timeout=CALL_TIMEOUT)
    assert first == {"token": "A", "final": True}
    items = collect(pool, {"mode": "tagged", "token": "B", "n": 5}, "sync")
    assert items == [{"token": "B", "i": i} for i in range(5)] + [{"token": "B", "final": True}]


# --- (c) other threads, (d) other ranks -----------------------------------------------------------


@HOW
def test_items_from_worker_threads_keep_each_threads_order(pool: DistributedRunner, how: str) -> None:
    """Two threads started in __call__ plus its main thread: all items arrive, each thread's in order."""
    n = 1_000
    items = collect(pool, {"mode": "threads", "n": n}, how)
    assert items[-1] == [False, False]  # both threads were joined before __call__ returned
    for name in ("t0", "t1", "main"):
        assert [i for who, i in items[:-1] if who == name] == list(range(n)), name
    assert len(items) == 3 * n + 1


def test_items_from_rank_1_never_reach_the_caller(pool: DistributedRunner) -> None:
    """Only rank 0's items are streamed; rank 1's are dropped there, with a warning on rank 1."""
    items = collect(pool, {"mode": "both_ranks", "n": 50}, "sync")
    assert items[:-1] == [{"rank": 0, "i": i} for i in range(50)]
    rank0_warnings, rank1_warnings = items[-1]
    assert rank0_warnings == []
    assert len(rank1_warnings) == 1 and "only rank 0" in rank1_warnings[0]


# --- (e) outside a call ---------------------------------------------------------------------------


def test_add_streaming_result_in_setup_fails_start() -> None:
    """Streaming from setup raises RuntimeError on the rank, which fails start() with WorkerError."""
    runner = DistributedRunner(StreamsInSetup, world_size=1)
    try:
        with pytest.raises(WorkerError, match="outside a running call") as info:
            runner.start_sync(timeout=120)
        assert info.value.exc_type == "RuntimeError" and info.value.rank == 0
        assert not runner.is_alive()
    finally:
        runner.stop_sync()


def test_add_streaming_result_after_call_returned_raises(pool: DistributedRunner) -> None:
    """A thread that outlives its call gets RuntimeError from add_streaming_result once the call is over."""
    assert pool.invoke_sync({"mode": "late_thread", "token": "late"}, timeout=CALL_TIMEOUT) is None
    deadline = time.monotonic() + WORKER_LIMIT + 10
    error = None
    while error is None and time.monotonic() < deadline:  # each poll leaves a gap between calls
        error = pool.invoke_sync({"mode": "late_error", "token": "late"}, timeout=CALL_TIMEOUT)
    assert error is not None and "outside a running call" in error
    assert_serves(pool)


# --- (f) timeouts ---------------------------------------------------------------------------------


@HOW
def test_streaming_timeout_fires_on_a_gap_between_items(pool: DistributedRunner, how: str) -> None:
    """No item for `streaming_timeout` s raises TimeoutError, cancels the call, and the pool serves on."""
    token = f"gap-{how}"
    items: list[Any] = []
    with pytest.raises(TimeoutError, match="streaming_timeout"):
        drain(pool, {"mode": "stall", "token": token}, how, items, streaming_timeout=2.0)
    assert items == ["first"]  # the first item came (in ms); the gap after it timed out
    assert pool.invoke_sync({"mode": "saw_cancel", "token": token}, timeout=CALL_TIMEOUT) is True
    assert_serves(pool)


@HOW
def test_timeout_fires_at_the_overall_deadline_while_items_flow(pool: DistributedRunner, how: str) -> None:
    """Items keep coming well within `streaming_timeout`, yet `timeout` ends (and cancels) the stream."""
    token = f"deadline-{how}"
    items: list[Any] = []
    with pytest.raises(TimeoutError, match="did not finish within"):
        drain(pool, {"mode": "drip", "token": token, "every": 0.01}, how, items, timeout=1.0, streaming_timeout=30)
    assert items == list(range(len(items)))  # whatever arrived before the deadline, in order
    assert pool.invoke_sync({"mode": "saw_cancel", "token": token}, timeout=CALL_TIMEOUT) is True
    assert_serves(pool)


# --- (g) leaving early, (h) slow consumer ---------------------------------------------------------


def test_closing_a_sync_stream_cancels_the_call(pool: DistributedRunner) -> None:
    """Closing the stream_sync generator early sets `cancelled` on the worker; the next call works."""
    stream = pool.stream_sync({"mode": "drip", "token": "close-sync", "every": 0.001}, timeout=CALL_TIMEOUT)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert pool.invoke_sync({"mode": "saw_cancel", "token": "close-sync"}, timeout=CALL_TIMEOUT) is True
    assert_serves(pool)


def test_aclose_on_an_async_stream_cancels_the_call(pool: DistributedRunner) -> None:
    """`aclose()` on the async stream early sets `cancelled` on the worker; the next call works."""

    async def main() -> list[Any]:
        stream = pool.stream({"mode": "drip", "token": "close-async", "every": 0.001}, timeout=CALL_TIMEOUT)
        got = [await asyncio.wait_for(stream.__anext__(), CALL_TIMEOUT) for _ in range(5)]
        await asyncio.wait_for(stream.aclose(), CALL_TIMEOUT)
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    assert pool.invoke_sync({"mode": "saw_cancel", "token": "close-async"}, timeout=CALL_TIMEOUT) is True
    assert_serves(pool)


@HOW
def test_slow_consumer_receives_every_item(pool: DistributedRunner, how: str) -> None:
    """A reader that pauses between 2,000 items of 1 KB each still gets all of them, in order."""
    n = 2_000

    def slow(stream: Iterator[Any]) -> list[Any]:
        out = []
        for item in stream:
            out.append(item)
            time.sleep(0.001)  # the slow consumer under test, not synchronisation
        return out

    payload = {"mode": "count", "n": n, "pad": 1024}
    if how == "sync":
        items = slow(pool.stream_sync(payload, timeout=CALL_TIMEOUT))
    else:

        async def main() -> list[Any]:
            out = []
            async for item in pool.stream(payload, timeout=CALL_TIMEOUT):
                out.append(item)
                await asyncio.sleep(0.001)
            return out

        items = asyncio.run(main())
    assert items[:-1] == [(i, "x" * 1024) for i in range(n)]
    assert items[-1] == {"done": n}


class Spawner(DistributedWorker):
    """Starts a thread that keeps streaming after its call returned (a user mistake)."""

    def setup(self) -> None:
        self.errors: list[str] = []

    def __call__(self, mode: str, streaming: bool = False) -> object:
        if mode == "spawn":

            def spam() -> None:
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    try:
                        self.add_streaming_result("from call A's thread")
                    except RuntimeError as exc:
                        if "earlier call" in str(exc):
                            self.errors.append(str(exc))
                            return
                    time.sleep(0.005)

            threading.Thread(target=spam, name="leftover", daemon=True).start()
            time.sleep(0.05)  # let it stream in this call
        if mode == "wait":
            time.sleep(0.5)
        if mode == "errors":
            return list(self.errors)
        return mode


def test_a_thread_left_over_from_a_call_cannot_stream_into_the_next() -> None:
    """Items of a thread that outlived its call never show up in a later stream; it gets an error."""
    with DistributedRunner(Spawner, world_size=1) as runner:
        list(runner.stream_sync({"mode": "spawn"}, timeout=30))
        assert list(runner.stream_sync({"mode": "wait"}, timeout=30)) == ["wait"]
        assert wait_until(lambda: runner.invoke_sync({"mode": "errors"}, timeout=30), 10, interval=0.2)
        errors = runner.invoke_sync({"mode": "errors"}, timeout=30)
    assert "'leftover' streamed in an earlier call" in errors[0]
