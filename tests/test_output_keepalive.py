"""Worker output reaches the driver prefixed with the rank; keepalive calls run when idle."""

from __future__ import annotations

import sys
import time

import pytest

from lightdist import DistributedRunner, DistributedWorker
from tests.conftest import wait_until


class Talker(DistributedWorker):
    def setup(self) -> None:
        self.rank_print("setup done")

    def __call__(self, streaming: bool = False, token: str = "") -> None:
        self.rank_print(f"rank_print {token}")
        self.rank_print(f"debug {token}", debug=True)
        print(f"plain print {token}")
        print(f"to stderr {token}", file=sys.stderr)


def test_rank_output_is_prefixed_in_the_driver(capsys: pytest.CaptureFixture[str]) -> None:
    """rank_print and plain prints of every rank arrive on the driver's stdout/stderr as `[rank N] ...`."""
    with DistributedRunner(Talker, world_size=2) as runner:
        runner.invoke_sync({"token": "t1"})
        seen = {"out": "", "err": ""}

        def arrived() -> bool:
            cap = capsys.readouterr()
            seen["out"] += cap.out
            seen["err"] += cap.err
            return all(f"[rank {r}] to stderr t1" in seen["err"] for r in (0, 1)) and all(
                f"[rank {r}] plain print t1" in seen["out"] for r in (0, 1)
            )

        assert wait_until(arrived, 10), seen
    out, err = seen["out"], seen["err"]
    for r in (0, 1):
        assert f"[rank {r}] setup done\n" in out
        assert f"[rank {r}] rank_print t1\n" in out
        assert f"[rank {r}] [debug] debug t1\n" in out
        assert f"[rank {r}] plain print t1\n" in out
        assert f"[rank {r}] to stderr t1\n" in err
    assert "to stderr" not in out and "plain print" not in err


class Counter(DistributedWorker):
    def setup(self) -> None:
        self.keepalives: list[float] = []

    def __call__(self, streaming: bool = False, kind: str = "") -> object:
        if kind == "keepalive":
            self.keepalives.append(time.monotonic())
            return None
        return len(self.keepalives)


def test_keepalive_runs_after_idle_interval() -> None:
    """After keepalive_interval idle seconds the pool invokes keepalive_payload on every rank."""
    runner = DistributedRunner(Counter, world_size=2, keepalive_interval=0.2, keepalive_payload={"kind": "keepalive"})
    runner.start_sync(timeout=120)
    try:
        # poll slower than the interval: each poll is a call, and calls reset the idle clock
        assert wait_until(lambda: runner.invoke_sync({"kind": "count"}, timeout=30) >= 1, 10, interval=0.5)
        before = runner.invoke_sync({"kind": "count"}, timeout=30)
        # a busy pool gets no keepalive: 20 back-to-back calls well inside one interval each
        for _ in range(20):
            runner.invoke_sync({"kind": "count"}, timeout=30)
        assert runner.invoke_sync({"kind": "count"}, timeout=30) == before
        assert wait_until(lambda: runner.invoke_sync({"kind": "count"}, timeout=30) >= before + 2, 10, interval=0.5)
    finally:
        runner.stop_sync()


def test_no_keepalive_by_default(echo_pool: DistributedRunner) -> None:
    """keepalive_interval=None (the default) never calls the workers on its own."""
    first = echo_pool.invoke_sync({"probe": 1})["calls"]
    time.sleep(0.5)
    assert echo_pool.invoke_sync({"probe": 2})["calls"] == first + 1


class Redraws(DistributedWorker):
    def __call__(self, streaming: bool = False) -> None:
        import time

        for pct in (10, 20, 30):
            sys.stderr.write(f"\rprogress {pct}%")
            sys.stderr.flush()
            time.sleep(0.05)
        sys.stderr.write("\n")


def test_carriage_return_redraws_pass_through_prefixed(capsys: pytest.CaptureFixture[str]) -> None:
    """A progress bar's "\\r" redraws reach the driver as they happen, each prefixed, so the line
    redraws in place instead of arriving as one long line at the end."""
    with DistributedRunner(Redraws, world_size=1) as runner:
        runner.invoke_sync(timeout=30)
        seen = {"err": ""}

        def arrived() -> bool:
            seen["err"] += capsys.readouterr().err
            return "progress 30%" in seen["err"] and seen["err"].endswith("\n")

        assert wait_until(arrived, 10), seen
    redraws = seen["err"][seen["err"].index("[rank 0] \r[rank 0] progress 10%") :]
    assert redraws.startswith("[rank 0] \r[rank 0] progress 10%\r[rank 0] progress 20%\r[rank 0] progress 30%\n")
