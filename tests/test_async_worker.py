"""``async def`` hooks on a real 2-rank pool: awaited on one event loop per rank, kept across calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from lightdist import DistributedRunner, DistributedWorker, WorkerError

CALL_TIMEOUT = 60.0


class AsyncWorker(DistributedWorker):
    """Every hook is async; ``op`` picks what a call does."""

    async def setup(self, greeting: str = "hi", **kwargs: Any) -> None:
        await asyncio.sleep(0)
        self.greeting = greeting
        self.setup_loop = asyncio.get_running_loop()
        # Bound to the setup loop on first use (as an aiohttp session or an async client would be):
        # usable in later calls only if they run on that same loop.
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        await self.queue.put(0)
        self.calls = 0

    async def __call__(self, op: str = "state", n: int = 0, streaming: bool = False) -> Any:
        await asyncio.sleep(0)
        self.calls += 1
        if op == "state":
            count = await self.queue.get()
            await self.queue.put(count + 1)
            same_loop = asyncio.get_running_loop() is self.setup_loop
            return {"greeting": self.greeting, "same_loop": same_loop, "count": count, "rank": self.rank}
        if op == "stream":
            if self.rank == 0:
                for i in range(n):
                    self.add_streaming_result({"i": i})
                    await asyncio.sleep(0)
                # From a to_thread worker thread too: each call gets fresh executor threads.
                await asyncio.to_thread(self.add_streaming_result, {"thread": threading.current_thread().name != ""})
            return {"done": n}
        if op == "raise":
            await self._fail_deep()
        if op == "wait_cancel":
            while not self.cancelled:
                await asyncio.sleep(0.01)
            self.saw_cancel = True
            return None
        if op == "saw_cancel":
            return getattr(self, "saw_cancel", False)
        raise ValueError(f"unknown op {op!r}")

    async def _fail_deep(self) -> None:
        await asyncio.sleep(0)
        raise KeyError("async boom")


@pytest.fixture(scope="module")
def pool() -> Iterator[DistributedRunner]:
    runner = DistributedRunner(AsyncWorker, world_size=2)
    runner.start_sync(timeout=120, greeting="hello")
    yield runner
    runner.stop_sync()


def test_async_setup_runs_and_its_loop_serves_every_call(pool: DistributedRunner) -> None:
    """Async setup's state is there, and every call runs on the loop setup ran on."""
    first = pool.invoke_sync({"op": "state"}, timeout=CALL_TIMEOUT)
    second = pool.invoke_sync({"op": "state"}, timeout=CALL_TIMEOUT)
    assert first["greeting"] == "hello" and first["same_loop"] and second["same_loop"]
    assert second["count"] == first["count"] + 1  # the loop-bound queue kept its state
    assert first["rank"] == 0


def test_async_call_streams_items_in_order_then_the_result(pool: DistributedRunner) -> None:
    """add_streaming_result works from an async __call__ and from its to_thread helpers, call after call."""
    for _ in range(2):  # the second call reuses nothing of the first one's executor threads
        items = list(pool.stream_sync({"op": "stream", "n": 3}, timeout=CALL_TIMEOUT))
        assert items == [{"i": 0}, {"i": 1}, {"i": 2}, {"thread": True}, {"done": 3}]


def test_async_stream_as_text_events(pool: DistributedRunner) -> None:
    events = list(pool.stream_sync({"op": "stream", "n": 1}, timeout=CALL_TIMEOUT, as_text_events=True))
    assert events == [b'data: {"i":0}\n\n', b'data: {"thread":true}\n\n', b'data: {"done":1}\n\n']


def test_async_call_raising_gives_worker_error_with_traceback(pool: DistributedRunner) -> None:
    """The remote traceback runs through the coroutine; the pool serves on."""
    with pytest.raises(WorkerError) as info:
        pool.invoke_sync({"op": "raise"}, timeout=CALL_TIMEOUT)
    assert info.value.exc_type == "KeyError" and "async boom" in info.value.message
    assert "_fail_deep" in info.value.remote_traceback
    assert pool.invoke_sync({"op": "state"}, timeout=CALL_TIMEOUT)["same_loop"]


def test_async_call_sees_cancelled_like_sync_code(pool: DistributedRunner) -> None:
    """A timed-out call is cancelled; the async body sees ``cancelled`` turn true and returns."""
    with pytest.raises(TimeoutError):
        pool.invoke_sync({"op": "wait_cancel"}, timeout=0.5)
    assert pool.invoke_sync({"op": "saw_cancel"}, timeout=CALL_TIMEOUT) is True


class AsyncTeardown(DistributedWorker):
    async def setup(self, path: str = "", **kwargs: Any) -> None:
        self.path = path

    def __call__(self, streaming: bool = False) -> None:
        return None

    async def teardown(self) -> None:
        await asyncio.sleep(0)
        with open(f"{self.path}.{self.rank}", "w") as f:
            f.write("torn down")


def test_async_teardown_is_awaited_on_stop(tmp_path: Any) -> None:
    runner = DistributedRunner(AsyncTeardown, world_size=2)
    runner.start_sync(timeout=120, path=str(tmp_path / "down"))
    runner.stop_sync()
    assert [(tmp_path / f"down.{r}").read_text() for r in (0, 1)] == ["torn down"] * 2
