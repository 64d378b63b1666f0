"""One test per seed-API method and parameter (../shared/seed-api.md), on real pools."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightdist import DistributedRunner, DistributedWorker, WorkerError
from lightdist._calls import encode_call
from tests.conftest import Echo, descendants, free_port, wait_until


class Introspect(DistributedWorker):
    """Reports what the pool set up on each rank, gathered to rank 0."""

    def setup(self, **kwargs: object) -> None:
        self.kwargs = kwargs
        self.seen_cancel = False

    def __call__(self, streaming: bool = False, what: str = "info", seconds: float = 0.0) -> object:
        if what == "sleep":  # cooperative: stops early once cancelled
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not self.cancelled:
                time.sleep(0.01)
            self.seen_cancel = self.cancelled
            return "slept"
        if what == "seen_cancel":
            return self.seen_cancel
        info = {
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "device": str(self.device),
            "backend": dist.get_backend(),
            "dist_rank": dist.get_rank(),
            "kwargs": self.kwargs,
            "cwd": os.getcwd(),
            "threads": torch.get_num_threads(),
            "streaming": streaming,
        }
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, info)
        return gathered


@pytest.fixture(scope="module")
def pool() -> DistributedRunner:
    runner = DistributedRunner(Introspect, world_size=2)
    runner.start_sync(timeout=120, model_path="/data/m", size=3)
    yield runner
    runner.stop_sync()


def test_constructor_defaults_match_the_seed() -> None:
    """Names and defaults of the seed's constructor (master_port defaults to a free port, not 29500)."""
    params = inspect.signature(DistributedRunner).parameters
    assert params["worker_cls"].default is DistributedWorker
    assert params["world_size"].default == 1
    assert params["timeout"].default == 86400
    assert params["keepalive_payload"].default == {}
    assert params["keepalive_interval"].default is None
    assert params["cwd"].default is None
    assert params["master_addr"].default == "127.0.0.1"
    assert params["worker_addr"].default == "127.0.0.1"
    assert params["worker_port"].default is None
    assert inspect.signature(DistributedRunner.start).parameters["timeout"].default == 1800
    assert inspect.signature(DistributedRunner.invoke).parameters["timeout"].default is None
    stream = inspect.signature(DistributedRunner.stream).parameters
    assert [stream[k].default for k in ("timeout", "streaming_timeout", "as_text_events")] == [None, None, False]
    assert inspect.signature(DistributedRunner.stop).parameters["timeout"].default == 10
    add = inspect.signature(DistributedWorker.add_streaming_result).parameters
    assert add["image_format"].default == "jpeg" and add["as_text_event"].default is False
    assert inspect.signature(DistributedWorker.rank_print).parameters["debug"].default is False


def test_start_kwargs_reach_setup_on_every_rank(pool: DistributedRunner) -> None:
    """start(**kwargs) → setup(**kwargs) on each rank; rank attributes and gloo on CPU."""
    infos = pool.invoke_sync()
    assert [i["rank"] for i in infos] == [0, 1] == [i["dist_rank"] for i in infos]
    for info in infos:
        assert info["kwargs"] == {"model_path": "/data/m", "size": 3}
        assert info["world_size"] == 2 and info["local_rank"] == info["rank"]
        assert info["device"] == "cpu" and info["backend"] == "gloo"
        assert info["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert info["streaming"] is False


def test_invoke_payload_and_streaming_flag(pool: DistributedRunner) -> None:
    """invoke() passes streaming=False, stream() streaming=True; payload keys become kwargs."""
    assert pool.invoke_sync({"what": "info"})[0]["streaming"] is False
    *_, final = pool.stream_sync({"what": "info"})
    assert final[0]["streaming"] is True
    with pytest.raises(ValueError, match="streaming"):
        pool.invoke_sync({"streaming": True})
    with pytest.raises(TypeError, match="payload must be a dict"):
        pool.invoke_sync(["not", "a", "dict"])  # type: ignore[arg-type]


def test_invoke_timeout_cancels_the_call(pool: DistributedRunner) -> None:
    """invoke(timeout) raises TimeoutError at the deadline, the ranks see `cancelled`, the pool serves on."""
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="cancelled"):
        pool.invoke_sync({"what": "sleep", "seconds": 30}, timeout=0.5)
    assert time.monotonic() - started < 5
    assert pool.invoke_sync({"what": "seen_cancel"}, timeout=30) is True
    assert pool.invoke_sync(timeout=30)[0]["rank"] == 0


def test_unpicklable_payload_names_the_key(pool: DistributedRunner) -> None:
    """A payload value that cannot travel fails in the caller, naming the key; nothing is sent."""
    with pytest.raises(TypeError, match="'lock'"):
        pool.invoke_sync({"what": "info", "lock": __import__("threading").Lock()})
    assert pool.invoke_sync(timeout=30)[0]["rank"] == 0


def test_cwd_sets_the_workers_directory(tmp_path: Path) -> None:
    """cwd= is the ranks' working directory for setup and calls."""
    runner = DistributedRunner(Introspect, world_size=2, cwd=tmp_path)
    runner.start_sync(timeout=120)
    try:
        assert {i["cwd"] for i in runner.invoke_sync()} == {str(tmp_path)}
    finally:
        runner.stop_sync()


def test_without_cwd_ranks_follow_the_driver(
    pool: DistributedRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With cwd=None each call runs in the driver's current directory."""
    monkeypatch.chdir(tmp_path)
    assert {i["cwd"] for i in pool.invoke_sync()} == {str(tmp_path)}


class AllReduceOnRank0Only(DistributedWorker):
    def __call__(self, streaming: bool = False) -> str:
        if self.rank == 0:
            dist.all_reduce(torch.ones(1))  # rank 1 never joins: only the group timeout ends this
        return "done"


def test_timeout_is_the_process_group_timeout() -> None:
    """The constructor's `timeout` is the collectives' timeout (seed: 24 h), not a call deadline."""
    runner = DistributedRunner(AllReduceOnRank0Only, world_size=2, timeout=2)
    runner.start_sync(timeout=120)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerError) as info:
            runner.invoke_sync(timeout=60)
        assert info.value.rank == 0
        assert time.monotonic() - started < 30
    finally:
        runner.stop_sync(timeout=2)


def test_explicit_master_port_hosts_the_store_there() -> None:
    """master_port= is honoured; by default the driver picks a free port for its store."""
    port = free_port()
    runner = DistributedRunner(Echo, world_size=1, master_port=port)
    runner.start_sync(timeout=120)
    try:
        assert runner.stats().store_port == port
        assert runner.invoke_sync({"a": 1})["payload"] == {"a": 1}
    finally:
        runner.stop_sync()


def test_worker_port_uses_tcp() -> None:
    """worker_port= puts the command channel on TCP at worker_addr instead of a private ipc socket."""
    port = free_port()
    runner = DistributedRunner(Echo, world_size=2, worker_port=port)
    runner.start_sync(timeout=120)
    try:
        assert runner.stats().address == runner.address == f"tcp://127.0.0.1:{port}"
        assert runner.invoke_sync({"b": 2})["payload"] == {"b": 2}
    finally:
        runner.stop_sync()


class Teardown(DistributedWorker):
    def setup(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def __call__(self, streaming: bool = False, block: bool = False) -> str:
        if block:  # ignores `cancelled`: only the stop escalation can end it
            while True:
                time.sleep(0.05)
        return "ok"

    def teardown(self) -> None:
        Path(self.out_dir, f"teardown-{self.rank}").write_text("done")


def test_stop_runs_teardown_on_every_rank(tmp_path: Path) -> None:
    """stop() sends EXIT: every rank runs teardown() and exits."""
    runner = DistributedRunner(Teardown, world_size=2)
    runner.start_sync(timeout=120, out_dir=str(tmp_path))
    pids = set(runner.pids.values())
    runner.stop_sync()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teardown-0", "teardown-1"]
    assert not pids & descendants()


def test_stop_escalates_past_a_stuck_call(tmp_path: Path) -> None:
    """A call that never returns cannot hold stop(timeout) up: EXIT → timeout → SIGTERM → SIGKILL."""
    runner = DistributedRunner(Teardown, world_size=2)
    runner.start_sync(timeout=120, out_dir=str(tmp_path))
    pids = set(runner.pids.values())
    pool = runner._pool
    assert pool is not None
    frames, outbound = encode_call({"block": True}, False, None, pool.transports)
    call = pool.submit(frames, streaming=False, outbound=outbound)
    started = time.monotonic()
    runner.stop_sync(timeout=1)
    assert time.monotonic() - started < 10
    assert call.finished.is_set()
    assert not pids & descendants()


def test_async_context_manager_starts_and_stops() -> None:
    """`async with runner:` starts the pool on entry and stops it on exit."""

    async def main() -> tuple[dict, set[int]]:
        async with DistributedRunner(Echo, world_size=2) as runner:
            return await runner.invoke({"k": "v"}), set(runner.pids.values())

    out, pids = asyncio.run(main())
    assert out["payload"] == {"k": "v"}
    assert wait_until(lambda: not pids & descendants(), 5)


def test_start_twice_is_refused() -> None:
    """start() on a running pool raises RuntimeError (seed behaviour) and leaves it running."""
    with DistributedRunner(Echo, world_size=1) as runner:
        with pytest.raises(RuntimeError, match="already running"):
            runner.start_sync()
        assert runner.invoke_sync({"x": 1})["payload"] == {"x": 1}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_world_size_is_validated(bad: object) -> None:
    """A world_size that is not a positive int is refused up front, saying what is expected."""
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        DistributedRunner(Echo, world_size=bad)  # type: ignore[arg-type]


def test_worker_cls_is_validated() -> None:
    with pytest.raises(TypeError, match="subclass of lightdist.DistributedWorker"):
        DistributedRunner(object, world_size=1)  # type: ignore[arg-type]


def test_other_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="keepalive_interval"):
        DistributedRunner(Echo, keepalive_interval=0)
    with pytest.raises(ValueError, match="timeout"):
        DistributedRunner(Echo, timeout=-5)
    with pytest.raises(ValueError, match="accelerator"):
        DistributedRunner(Echo, accelerator="tpu")
    with pytest.warns(DeprecationWarning, match="set_device"):
        DistributedRunner(Echo, set_device=True)
