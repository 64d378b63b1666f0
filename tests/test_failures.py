"""Failure handling on real 2-rank gloo pools: errors from any rank, dead ranks, timeouts,
cancellation, start failures, orphans and concurrency (design §5–§6, docs/failures.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightdist import DistributedRunner, DistributedWorker, WorkerDiedError, WorkerError, WorkerFailedError
from tests.conftest import descendants, pid_alive, wait_until

GRACE = 0.5  # seconds a rank gets to finish a failed or cancelled call before it is replaced
DETECT_S = 2.0  # the bound on how fast an error or a death reaches the caller


class Faulty(DistributedWorker):
    """Misbehaves on request; reports its identity so tests can tell kept ranks from new ones."""

    def setup(self, tag: str = "") -> None:
        self.tag = tag
        self.setups = getattr(self, "setups", 0) + 1
        self.saw_cancel = False

    def __call__(
        self, streaming: bool = False, mode: str = "ok", who: str = "", token: str = "", seconds: float = 60.0
    ) -> object:
        if mode == "raise" and (who == "all" or str(self.rank) == who):
            raise ValueError(f"boom on rank {self.rank} ({token})")
        if mode == "raise":  # the others wait in a collective that the raising rank never joins
            dist.all_reduce(torch.ones(1))
        if mode == "wedge":  # rank 1 enters a collective that rank 0 leaves for when it is cancelled
            if self.rank == 1:
                dist.all_reduce(torch.ones(1))
            mode = "sleep_coop"
        if mode in ("sleep", "sleep_coop"):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not (mode == "sleep_coop" and self.cancelled):
                if streaming and self.rank == 0:
                    self.add_streaming_result("tick")
                time.sleep(0.02)
            self.saw_cancel = self.cancelled
            return {"late": token}
        if mode == "saw_cancel":
            return self.saw_cancel
        # "ok": a collective proves the group works; every rank reports who it is
        total = torch.ones(1)
        dist.all_reduce(total)
        who_am_i = [None] * self.world_size
        dist.all_gather_object(who_am_i, {"pid": os.getpid(), "setups": self.setups, "tag": self.tag})
        if streaming and self.rank == 0:
            self.add_streaming_result({"token": token})
        return {"sum": total.item(), "ranks": who_am_i, "token": token}


@pytest.fixture()
def pool() -> Iterator[DistributedRunner]:
    runner = DistributedRunner(Faulty, world_size=2, grace_period=GRACE)
    runner.start_sync(timeout=120, tag="orig")
    yield runner
    runner.stop_sync()


def healthy(runner: DistributedRunner, token: str = "next") -> dict:
    """The next call works end to end (a collective included)."""
    out = runner.invoke_sync({"token": token}, timeout=60)
    assert out["sum"] == 2.0 and out["token"] == token
    assert all(r["tag"] == "orig" for r in out["ranks"]), "respawned ranks re-run setup with the original kwargs"
    return out


def timed(fn):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc, time.monotonic() - started
    raise AssertionError("expected an exception")


# --- 1. errors from any rank --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_error_on_rank1_while_rank0_waits_in_all_reduce(pool: DistributedRunner, how: str) -> None:
    """Rank 1 raises, rank 0 is blocked in all_reduce: WorkerError from rank 1 within 2 s; rank 0
    is replaced after the grace period, rank 1 keeps its process and setup state; next call works."""
    before = healthy(pool, "before")["ranks"]
    payload = {"mode": "raise", "who": "1", "token": how}
    call = (
        (lambda: pool.invoke_sync(payload, timeout=60))
        if how == "invoke"
        else (lambda: list(pool.stream_sync(payload, timeout=60)))
    )
    err, took = timed(call)
    assert isinstance(err, WorkerError) and err.rank == 1 and err.exc_type == "ValueError"
    assert isinstance(err, WorkerFailedError)  # the base callers catch for "the call's work is lost"
    assert f"boom on rank 1 ({how})" in err.message
    assert 'raise ValueError(f"boom on rank {self.rank} ({token})")' in err.remote_traceback
    assert took < DETECT_S
    after = healthy(pool)["ranks"]
    assert after[1] == before[1], "the rank that raised kept its process and setup state"
    assert after[0]["pid"] != before[0]["pid"], "the rank stuck in the collective was replaced"


def call(pool: DistributedRunner, how: str, payload: dict) -> object:
    if how == "invoke":
        return pool.invoke_sync(payload, timeout=60)
    return list(pool.stream_sync(payload, timeout=60))


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_error_on_rank0_only(pool: DistributedRunner, how: str) -> None:
    before = healthy(pool, "before")["ranks"]
    err, took = timed(lambda: call(pool, how, {"mode": "raise", "who": "0", "token": "r0"}))
    assert isinstance(err, WorkerError) and err.rank == 0 and "boom on rank 0 (r0)" in str(err)
    assert took < DETECT_S
    after = healthy(pool)["ranks"]
    assert after[0] == before[0] and after[1]["pid"] != before[1]["pid"]


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_error_on_every_rank_keeps_every_process(pool: DistributedRunner, how: str) -> None:
    """Every rank raises before any collective: the error arrives, nothing is killed, the group stays."""
    before = healthy(pool, "before")["ranks"]
    err, took = timed(lambda: call(pool, how, {"mode": "raise", "who": "all"}))
    assert isinstance(err, WorkerError) and err.exc_type == "ValueError" and took < DETECT_S
    assert healthy(pool)["ranks"] == before
    assert pool.stats().recoveries == 0  # type: ignore[union-attr]


# --- 2. dead ranks ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_rank_killed_during_a_call(pool: DistributedRunner, how: str) -> None:
    """SIGKILL during a call → WorkerDiedError (rank, signal) within 2 s; respawned; next call works."""
    before = healthy(pool, "before")["ranks"]
    victim = pool.pids[1]
    killer = threading.Timer(0.3, os.kill, args=(victim, signal.SIGKILL))
    payload = {"mode": "sleep", "token": how}
    call = (
        (lambda: pool.invoke_sync(payload, timeout=60))
        if how == "invoke"
        else (lambda: list(pool.stream_sync(payload, timeout=60)))
    )
    killer.start()
    err, took = timed(call)
    killer.join()
    assert isinstance(err, WorkerDiedError), repr(err)
    assert err.rank == 1 and err.signal == signal.SIGKILL and err.exitcode is None
    assert "rank 1 was killed by SIGKILL" in str(err)
    assert took < 0.3 + DETECT_S
    after = healthy(pool)["ranks"]
    assert after[1]["pid"] != before[1]["pid"] and after[1]["setups"] == 1
    assert not pid_alive(victim)


def test_rank_killed_while_idle_is_reported_to_the_next_call(pool: DistributedRunner) -> None:
    """A rank that dies between calls: the next call raises WorkerDiedError, the one after works."""
    before = healthy(pool, "before")["ranks"]
    os.kill(pool.pids[0], signal.SIGKILL)
    assert wait_until(lambda: pool.stats().recoveries == 1, 10)  # type: ignore[union-attr]
    err, took = timed(lambda: pool.invoke_sync({"token": "x"}, timeout=60))
    assert isinstance(err, WorkerDiedError) and err.rank == 0 and took < DETECT_S
    after = healthy(pool)["ranks"]
    assert after[0]["pid"] != before[0]["pid"] and after[1] == before[1]
    assert pool.is_alive()


# --- 3. timeouts --------------------------------------------------------------------------------


def test_timeout_cancels_and_a_late_reply_never_reaches_a_later_call(pool: DistributedRunner) -> None:
    """The call times out at its deadline; the ranks see `cancelled` and return; their late reply
    ({"late": ...}) is dropped; the next call gets its own result; nothing was killed."""
    before = healthy(pool, "before")["ranks"]
    err, took = timed(lambda: pool.invoke_sync({"mode": "sleep_coop", "token": "old"}, timeout=0.5))
    assert isinstance(err, TimeoutError) and 0.5 <= took < 0.5 + DETECT_S
    out = healthy(pool, "new")
    assert out["token"] == "new" and out["ranks"] == before
    assert pool.invoke_sync({"mode": "saw_cancel"}, timeout=30) is True


def test_a_timed_out_call_is_never_killed_for_being_slow(pool: DistributedRunner) -> None:
    """As in fal.distributed, ranks that ignore `cancelled` finish their call: nothing is killed
    (the model stays loaded), and the next call runs once they are done, on the same processes."""
    before = healthy(pool, "before")["ranks"]
    err, took = timed(lambda: pool.invoke_sync({"mode": "sleep", "seconds": 3 * GRACE + 1.0}, timeout=0.5))
    assert isinstance(err, TimeoutError) and took < 0.5 + DETECT_S
    out = healthy(pool)  # queued behind the slow call, not racing it
    assert out["ranks"] == before, "a slow cancelled call must not cost the ranks their processes"
    assert pool.stats().recoveries == 0


def test_a_rank_left_alone_in_a_collective_is_replaced_after_the_grace_period(pool: DistributedRunner) -> None:
    """Cancelled while rank 1 waits in all_reduce for rank 0, which returns when it sees `cancelled`:
    rank 1 can never leave (gloo cannot abort), so once its peer left the call it gets the grace
    period and is then replaced; rank 0 keeps its process."""
    before = healthy(pool, "before")["ranks"]
    err, took = timed(lambda: pool.invoke_sync({"mode": "wedge"}, timeout=0.5))
    assert isinstance(err, TimeoutError) and took < 0.5 + DETECT_S
    after = healthy(pool)["ranks"]
    assert after[0] == before[0] and after[1]["pid"] != before[1]["pid"]
    assert pool.stats().recoveries == 1


def test_stream_timeouts_cancel_the_call(pool: DistributedRunner) -> None:
    err, took = timed(lambda: list(pool.stream_sync({"mode": "sleep_coop"}, timeout=0.6)))
    assert isinstance(err, TimeoutError) and "did not finish" in str(err) and took < 0.6 + DETECT_S
    healthy(pool)
    err, _ = timed(lambda: list(pool.stream_sync({"mode": "sleep_coop"}, streaming_timeout=0.01, timeout=30)))
    assert isinstance(err, TimeoutError)
    healthy(pool)


# --- 4. cancellation ----------------------------------------------------------------------------


def test_cancelling_the_awaiting_task_cancels_on_every_rank(pool: DistributedRunner) -> None:
    async def main() -> object:
        task = asyncio.create_task(pool.invoke({"mode": "sleep_coop"}))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await pool.invoke({"mode": "saw_cancel"}, timeout=30)

    assert asyncio.run(main()) is True
    healthy(pool)


SIGINT_DRIVER = """
import os, signal, sys, time
from lightdist import DistributedRunner, DistributedWorker

class W(DistributedWorker):
    def __call__(self, streaming=False, mode="ok"):
        if mode == "sleep":
            while not self.cancelled:
                time.sleep(0.01)
            return "stopped"
        return "ok"

handler = signal.getsignal(signal.SIGINT)
runner = DistributedRunner(W, world_size=2, grace_period=0.5)
runner.start_sync(timeout=120)
print("READY", flush=True)
started = time.monotonic()
try:
    runner.invoke_sync({"mode": "sleep"}, timeout=60)
except KeyboardInterrupt:
    print("INTERRUPTED after %.2f s" % (time.monotonic() - started), flush=True)
print("HANDLER UNCHANGED", signal.getsignal(signal.SIGINT) is handler, flush=True)
print("NEXT", runner.invoke_sync(timeout=30), "RECOVERIES", runner.stats().recoveries, flush=True)
runner.stop_sync()
"""


def test_ctrl_c_in_a_blocking_call(tmp_path: Path) -> None:
    """SIGINT to a driver blocked in invoke_sync: KeyboardInterrupt there, CANCEL on every rank, the
    SIGINT handler untouched, the pool warm (no rank replaced) and the next call works."""
    script = tmp_path / "driver.py"
    script.write_text(SIGINT_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "INTERRUPTED after" in out and "HANDLER UNCHANGED True" in out
    assert "NEXT ok RECOVERIES 0" in out


# --- 5. start failures --------------------------------------------------------------------------


class SetupFails(DistributedWorker):
    def setup(self, bad_rank: int = 1, sleep: float = 0.0) -> None:
        time.sleep(sleep)
        if self.rank == bad_rank:
            raise RuntimeError(f"cannot load the model on rank {self.rank}")


def test_setup_error_fails_start_and_leaves_no_process() -> None:
    before = descendants()
    runner = DistributedRunner(SetupFails, world_size=2)
    err, took = timed(lambda: runner.start_sync(timeout=120, bad_rank=1))
    assert isinstance(err, WorkerError) and err.rank == 1 and err.exc_type == "RuntimeError"
    assert "cannot load the model on rank 1" in err.remote_traceback and "in setup" in err.remote_traceback
    assert wait_until(lambda: descendants() == before, 5), descendants() - before
    assert not runner.is_alive()


def test_start_timeout_leaves_no_process() -> None:
    before = descendants()
    runner = DistributedRunner(SetupFails, world_size=2)
    err, took = timed(lambda: runner.start_sync(timeout=1.5, bad_rank=-1, sleep=30))
    assert isinstance(err, TimeoutError) and "ranks [0, 1] were not ready within 1.5 s" in str(err)
    assert took < 1.5 + DETECT_S
    assert wait_until(lambda: descendants() == before, 5), descendants() - before


# --- 6. no orphans ------------------------------------------------------------------------------

ORPHAN_DRIVER = """
import time
from lightdist import DistributedRunner, DistributedWorker

class W(DistributedWorker):
    def __call__(self, streaming=False):
        return None

runner = DistributedRunner(W, world_size=2)
runner.start_sync(timeout=120)
print(runner._pool._ipc_dir, runner.stats().template_pid, *runner.pids.values(), flush=True)
time.sleep(120)
"""


def test_workers_exit_when_the_driver_is_sigkilled(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(ORPHAN_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ipc_dir, *fields = proc.stdout.readline().split()
        pids = [int(p) for p in fields]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids) and Path(ipc_dir).is_dir()
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5), [p for p in pids if pid_alive(p)]
        assert wait_until(lambda: not Path(ipc_dir).exists(), 5), "the template removes the pool's ipc directory"
    finally:
        proc.kill()


ATEXIT_DRIVER = """
import sys
from pathlib import Path
from lightdist import DistributedRunner, DistributedWorker

class W(DistributedWorker):
    def __call__(self, streaming=False):
        return None
    def teardown(self):
        Path(sys.argv[1], f"teardown-{self.rank}").write_text("ok")

runner = DistributedRunner(W, world_size=2)
runner.start_sync(timeout=120)
runner.invoke_sync()
print(runner.stats().template_pid, *runner.pids.values(), flush=True)
# no stop(): the interpreter exits and atexit stops the pool
"""


def test_stop_runs_at_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(ATEXIT_DRIVER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert not any(pid_alive(p) for p in pids)
    assert sorted(p.name for p in tmp_path.glob("teardown-*")) == ["teardown-0", "teardown-1"]


# --- 7. concurrency -----------------------------------------------------------------------------


class Serial(DistributedWorker):
    def setup(self) -> None:
        self.busy = False
        self.order: list[int] = []

    def __call__(self, streaming: bool = False, i: int = -1) -> object:
        if i < 0:
            return self.order
        assert not self.busy, "two calls overlapped on one rank"
        self.busy = True
        time.sleep(0.002)
        self.order.append(i)
        self.busy = False
        if streaming and self.rank == 0:
            self.add_streaming_result(i)
        return i


def test_calls_from_many_tasks_run_one_at_a_time_in_arrival_order() -> None:
    with DistributedRunner(Serial, world_size=2) as runner:

        async def main() -> list[object]:
            async def one(i: int) -> object:
                if i % 3 == 0:
                    return [x async for x in runner.stream({"i": i}, timeout=60)]
                return await runner.invoke({"i": i}, timeout=60)

            return await asyncio.gather(*(one(i) for i in range(40)))

        results = asyncio.run(main())
        assert results == [[i, i] if i % 3 == 0 else i for i in range(40)]
        assert runner.invoke_sync({"i": -1}, timeout=30) == list(range(40))


def test_calls_from_many_threads_each_get_their_own_result() -> None:
    with DistributedRunner(Serial, world_size=2) as runner:
        results: dict[int, object] = {}

        def worker(base: int) -> None:
            for k in range(10):
                results[base + k] = runner.invoke_sync({"i": base + k}, timeout=60)

        threads = [threading.Thread(target=worker, args=(100 * t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == {i: i for i in results} and len(results) == 40
        order = runner.invoke_sync({"i": -1}, timeout=30)
        assert sorted(order) == sorted(results)
        for t in range(4):  # each thread's calls ran in the order it made them
            mine = [i for i in order if i // 100 == t]
            assert mine == sorted(mine)


# --- recovery edge cases ------------------------------------------------------------------------


class DDPInSetup(DistributedWorker):
    """The seed's DDP pattern, with the hook that re-wraps the model after a group rebuild."""

    def setup(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.ddp = DDP(torch.nn.Linear(4, 1))

    def on_process_group_rebuilt(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.ddp = DDP(self.ddp.module)

    def __call__(self, streaming: bool = False, fail: bool = False) -> str:
        if fail and self.rank == 1:
            raise ValueError("rank 1 gives up before backward")
        self.ddp(torch.ones(2, 4)).sum().backward()  # rank 0 times out in DDP's all-reduce
        return "ok"


def test_collective_failure_inside_ddp_rebuilds_the_group() -> None:
    """A gloo timeout raised from DDP's reducer (no torch.distributed frame) still counts as a
    failed collective: the group is rebuilt, the hook re-wraps DDP, and later calls work."""
    runner = DistributedRunner(DDPInSetup, world_size=2, timeout=2, grace_period=10)
    runner.start_sync(timeout=120)
    try:
        with pytest.raises(WorkerError):
            runner.invoke_sync({"fail": True}, timeout=60)
        for _ in range(3):
            assert runner.invoke_sync(timeout=60) == "ok"
        assert runner.stats().recoveries == 1  # type: ignore[union-attr]
    finally:
        runner.stop_sync(timeout=2)


class DiesInSetupWhenFlagged(DistributedWorker):
    def setup(self, flag: str = "") -> None:
        if self.rank == 1 and os.path.exists(flag):
            os._exit(5)  # e.g. the OOM killer, every time the respawned rank loads its model


def test_a_rank_that_keeps_dying_in_setup_breaks_the_pool_instead_of_looping(tmp_path: Path) -> None:
    flag = tmp_path / "die"
    runner = DistributedRunner(DiesInSetupWhenFlagged, world_size=2)
    runner.start_sync(timeout=120, flag=str(flag))
    try:
        flag.touch()
        os.kill(runner.pids[1], signal.SIGKILL)
        assert wait_until(lambda: not runner.is_alive(), 10)
        with pytest.raises(RuntimeError, match="ranks kept dying while it restarted them"):
            runner.invoke_sync(timeout=10)
    finally:
        runner.stop_sync(timeout=1)
