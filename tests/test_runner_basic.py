"""Start, invoke, stream, stop on a real 2-rank gloo pool."""

from __future__ import annotations

import pytest

from lightdist import DistributedRunner, PoolClosedError
from tests.conftest import Echo, descendants


def test_invoke_returns_rank0_value(echo_pool: DistributedRunner) -> None:
    out = echo_pool.invoke_sync({"x": 1})
    assert out["rank"] == 0 and out["payload"] == {"x": 1} and out["tag"] == "shared"


def test_stream_final_result_is_last_item(echo_pool: DistributedRunner) -> None:
    items = list(echo_pool.stream_sync({"y": 2}))
    assert len(items) == 1 and items[0]["payload"] == {"y": 2}


def test_stop_is_idempotent_and_reaps_every_process() -> None:
    runner = DistributedRunner(Echo, world_size=2)
    runner.start_sync(timeout=120)
    pids = set(runner.pids.values())
    assert len(pids) == 2 and pids <= descendants()
    runner.stop_sync()
    runner.stop_sync()
    assert not (pids & descendants())
    with pytest.raises(PoolClosedError, match="start"):
        runner.invoke_sync()
