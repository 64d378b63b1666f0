"""Fabric(strategy="lightdist") with real Lightning Fabric objects on a real 2-rank gloo pool: the
same warm ranks as Trainer(strategy="lightdist"), rank 0's value back, errors and Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader, TensorDataset

from lightdist import PoolStrategy, WorkerDiedError, WorkerError
from lightdist.lightning import FabricPoolStrategy, TrainerWorker
from lightdist.lightning import strategy as strategy_module
from tests.conftest import shared_lightning_pool, wait_until


@pytest.fixture(scope="module", autouse=True)
def shared_pool() -> Iterator[None]:
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        yield


def fabric(**kwargs: Any) -> Fabric:
    return Fabric(strategy="lightdist", accelerator="cpu", devices=2, **kwargs)


def rank_pids(fabric: Fabric) -> list[int]:
    return [int(p) for p in fabric.all_gather(torch.tensor(os.getpid()))]


def train(fabric: Fabric, model: torch.nn.Module, out: str) -> dict[str, Any]:
    """A small Fabric training function that uses what Fabric offers inside launch()."""
    first_draw = torch.rand(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=8))
    seen = 0
    for x, y in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        fabric.log("loss", loss.item())
        seen += len(x)
    fabric.save(Path(out, "state.ckpt"), {"model": model, "seen": seen})
    state = {"model": model, "seen": -1}
    fabric.load(Path(out, "state.ckpt"), state)
    fabric.barrier()
    return {
        "rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "seen_by_all": fabric.all_reduce(torch.tensor(float(seen)), reduce_op="sum"),
        "loaded_seen": state["seen"],
        "first_draws": fabric.all_gather(first_draw).flatten().tolist(),
        "weight_sum": sum(p.sum() for p in model.parameters()).item(),
        "pids": rank_pids(fabric),
    }


def test_launch_runs_on_the_warm_ranks_and_returns_rank_0s_value(tmp_path: Path) -> None:
    """fn(fabric, *args) runs on both ranks with setup/dataloaders/backward/collectives/save/load/log;
    rank 0's value comes back; the ranks are the Trainer's; new Fabric objects reuse them; what fn
    changed on the ranks stays there; a launch after seeding draws as a ddp_spawn launch would."""
    assert STRATEGY_REGISTRY["lightdist"]["strategy"] is FabricPoolStrategy
    assert StrategyRegistry["lightdist"]["strategy"] is PoolStrategy  # the Trainer's own registry, untouched
    first = fabric(loggers=CSVLogger(tmp_path, flush_logs_every_n_steps=1))
    assert isinstance(first.strategy, FabricPoolStrategy)
    model = torch.nn.Linear(4, 1)
    before = sum(p.sum() for p in model.parameters()).item()
    torch.manual_seed(0)
    expected_draw = torch.rand(1).item()
    torch.manual_seed(0)
    out = first.launch(train, model, str(tmp_path))

    assert out["rank"] == 0 and out["world_size"] == 2
    assert out["seen_by_all"] == 64 and out["loaded_seen"] == 32  # each rank saw its half of the data
    assert out["first_draws"] == pytest.approx([expected_draw, expected_draw])  # the driver's RNG, as spawn
    assert out["weight_sum"] != pytest.approx(before)  # trained on the ranks ...
    assert sum(p.sum() for p in model.parameters()).item() == before  # ... not in the driver (copies)
    assert set(torch.load(tmp_path / "state.ckpt", weights_only=False)) == {"model", "seen"}
    rows = (Path(first.logger.log_dir) / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("loss") and len(rows) == 1 + 4, rows  # rank 0's 4 steps, where the driver looks

    pool = first.strategy.pool()
    assert sorted(out["pids"]) == sorted(pool.pids.values())
    assert L.Trainer(strategy="lightdist", accelerator="cpu", devices=2).strategy.pool() is pool
    started = time.monotonic()
    assert fabric().launch(rank_pids) == out["pids"]  # another Fabric, the same warm ranks
    assert time.monotonic() - started < 2.0  # a call, not a process start (~5-25 s here)


def fails_on_rank_1(fabric: Fabric) -> None:
    if fabric.global_rank == 1:
        raise ValueError("bad step on rank 1")
    fabric.barrier()  # rank 0 waits for a peer that never comes


def dies_on_rank_1(fabric: Fabric) -> None:
    if fabric.global_rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    fabric.barrier()


def uses(fabric: Fabric, thing: object) -> None:
    pass


def test_errors_as_for_the_trainer() -> None:
    """A rank's exception is a WorkerError with its rank and traceback, a dead rank a
    WorkerDiedError; launch() without a function and an argument that cannot travel are one-line
    errors that say what to do; the pool serves the next launch."""
    f = fabric()
    with pytest.raises(WorkerError) as info:
        f.launch(fails_on_rank_1)
    assert info.value.rank == 1 and "bad step on rank 1" in info.value.remote_traceback
    assert "fails_on_rank_1" in info.value.remote_traceback
    with pytest.raises(WorkerDiedError, match="rank 1 was killed by SIGKILL"):
        f.launch(dies_on_rank_1)
    with pytest.raises(TypeError, match=r"call `fabric.launch\(train, ...\)`"):
        fabric().launch()
    with pytest.raises(TypeError, match=r"argument 1 \(lock\) cannot be sent to the lightdist pool"):
        f.launch(uses, threading.Lock())
    assert sorted(f.launch(rank_pids)) == sorted(f.strategy.pool().pids.values())


def trains_until_stopped(fabric: Fabric, started: str) -> None:
    model = fabric.setup(torch.nn.Linear(4, 1))
    if fabric.global_rank == 0:
        Path(started).touch()
    for _ in range(3000):  # ~30 s unless stopped
        time.sleep(0.01)
        fabric.backward(model(torch.randn(8, 4)).pow(2).mean())


def never_calls_backward(fabric: Fabric, started: str) -> None:
    if fabric.global_rank == 0:
        Path(started).touch()
    time.sleep(30)


def interrupted_launch(f: Fabric, function: Any, started: Path, match: str) -> float:
    """Launch ``function``, SIGINT the main thread (as Ctrl-C would) once rank 0 started; seconds
    from the signal until launch() raised KeyboardInterrupt."""
    main = threading.main_thread().ident
    assert main is not None
    sent: list[float] = []

    def interrupt() -> None:
        if wait_until(started.exists, 60):
            time.sleep(0.3)  # well into the function
            sent.append(time.monotonic())
            signal.pthread_kill(main, signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt, match=match):
            f.launch(function, str(started))
        return time.monotonic() - sent[0]
    finally:
        sender.join(timeout=70)


def test_ctrl_c_stops_every_rank_and_keeps_the_pool_warm(tmp_path: Path) -> None:
    """SIGINT to the driver's main thread during a launch: KeyboardInterrupt in the caller within
    2 s, the ranks stopped together at a backward() (none replaced), the SIGINT handler untouched,
    the next launch on the same ranks. A function that never calls backward() is stopped too:
    its ranks are replaced after the grace period (2 s)."""
    f = fabric()
    pool = f.strategy.pool()
    pids, recoveries = dict(pool.pids), pool.stats().recoveries
    handler = signal.getsignal(signal.SIGINT)
    stopped_after = interrupted_launch(f, trains_until_stopped, tmp_path / "training", "every rank stopped")
    assert stopped_after < 2.0, f"launch returned {stopped_after:.2f} s after SIGINT"
    assert signal.getsignal(signal.SIGINT) is handler
    assert sorted(f.launch(rank_pids)) == sorted(pids.values())
    assert pool.pids == pids and pool.stats().recoveries == recoveries

    stopped_after = interrupted_launch(f, never_calls_backward, tmp_path / "sleeping", "were replaced")
    assert stopped_after < 2.0 + 2.0
    assert set(f.launch(rank_pids)).isdisjoint(pids.values())


def talk(fabric: Fabric) -> None:
    warnings.warn("fabric test: filtered by the driver", UserWarning, stacklevel=1)
    fabric.print("fabric test: fabric.print")
    print(f"fabric test: print of rank {fabric.global_rank}", flush=True)


def test_output_as_for_the_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    """The driver's warning filters apply in fn; fabric.print shows once, unprefixed, as in-process;
    plain prints keep their rank (docs/lightning.md, Output)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fabric test: filtered")
        fabric().launch(talk)
    seen = {"out": "", "err": ""}

    def arrived() -> bool:
        cap = capsys.readouterr()
        seen["out"] += cap.out
        seen["err"] += cap.err
        return all(f"[rank {r}] fabric test: print of rank {r}\n" in seen["out"] for r in (0, 1))

    assert wait_until(arrived, 30), seen
    assert seen["out"].splitlines().count("fabric test: fabric.print") == 1, seen
    assert "filtered by the driver" not in seen["err"], seen
