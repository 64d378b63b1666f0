"""PoolStrategy(server=URL) against a real ``lightdist serve``: real HTTP, a real server process and pool.

The model comes from a ``mymod.py`` in a temporary directory that only this (the client) process
has on its ``sys.path``: the server never sees that directory, so the call only works if the
module travels by value. Results are compared with the same fit on a local pool.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightdist import WorkerDiedError, WorkerError
from lightdist.lightning import PoolStrategy, TrainerWorker
from lightdist.lightning import strategy as strategy_module
from lightdist.lightning._remote import RemoteRunner
from lightdist.server._client import ServerGone
from tests.conftest import shared_lightning_pool
from tests.server_helpers import RunningServer
from tests.test_server import server  # the module's server: lightdist serve, 2 CPU ranks
from tests.test_server_pyclient import STEPS_PER_EPOCH, mymod, restore_env, trainer, weights

__all__ = ["mymod", "restore_env", "server"]  # fixtures used by name

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def local_pool() -> Iterator[None]:
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        yield


def url(server: RunningServer) -> str:
    return f"{server.server.url}?token={server.server.token}"


def test_attach_is_fast_and_the_layout_is_checked_against_the_server(server: RunningServer) -> None:
    times = []
    for _ in range(5):
        remote = RemoteRunner(url(server))
        assert remote.attach_s is None  # nothing connects before it is needed
        assert remote.world_size == 2 and remote.accelerator == "cpu"
        assert remote.attach_s is not None
        times.append(remote.attach_s)
    print(f"attach (find server + token + GET /v1/server): {', '.join(f'{t * 1000:.1f} ms' for t in times)}")
    assert min(times) < 0.5
    with pytest.raises(ValueError, match=r"asks for 3 devices but the server at .* runs 2 ranks; use devices=2"):
        trainer(PoolStrategy(server=url(server)), devices=3)
    with pytest.raises(ValueError, match="PoolStrategy takes runner= or server=, not both"):
        PoolStrategy(server=url(server), runner=RemoteRunner(url(server)))


def test_nothing_connects_before_the_trainer_is_built() -> None:
    strategy = PoolStrategy(server="http://127.0.0.1:9?token=t")  # nothing listens on the discard port
    with pytest.raises(ServerGone, match="no lightdist server answers at http://127.0.0.1:9"):
        trainer(strategy)
    with pytest.raises(ValueError, match=r"PoolStrategy\(token=\.\.\.\) goes with server=URL"):
        PoolStrategy(token="abc")


def test_fit_on_the_server_leaves_the_driver_as_a_local_fit_does(
    server: RunningServer, local_pool: None, mymod: ModuleType, tmp_path: Path, restore_env: None
) -> None:
    runs = {}
    for kind in ("local", "server"):
        L.seed_everything(0)
        model = mymod.Model()
        root = tmp_path / kind
        checkpoint = ModelCheckpoint(dirpath=root / "ckpts", monitor="val_loss", save_last=True)
        events: list[dict[str, Any]] = []
        strategy = PoolStrategy(on_event=events.append, **({"server": url(server)} if kind == "server" else {}))
        t = trainer(
            strategy, logger=TensorBoardLogger(root, name="runs"), callbacks=[checkpoint], enable_checkpointing=True
        )
        t.fit(model, datamodule=mymod.Data())
        runs[kind] = (t, model, checkpoint, events)
    (local, local_model, local_ckpt, local_events), (t, model, ckpt, events) = runs["local"], runs["server"]
    assert all(torch.equal(a, b) for a, b in zip(weights(local_model).values(), weights(model).values()))
    assert t.global_step == local.global_step == 2 * STEPS_PER_EPOCH and t.current_epoch == 2
    assert t.state.status.name == "FINISHED" and t.state.fn.name == "FITTING"
    assert t.callback_metrics.keys() == local.callback_metrics.keys() >= {"train_loss", "val_loss"}
    assert torch.equal(t.callback_metrics["val_loss"], local.callback_metrics["val_loss"])
    assert t.logged_metrics.keys() == local.logged_metrics.keys()
    root = tmp_path / "server"
    assert ckpt.dirpath == str(root / "ckpts") and Path(ckpt.best_model_path).is_file()
    assert Path(ckpt.best_model_path).name == Path(local_ckpt.best_model_path).name
    assert torch.equal(ckpt.best_model_score, local_ckpt.best_model_score)
    assert Path(ckpt.last_model_path).is_file() and (root / "runs" / "version_0").is_dir()
    assert model.trainer is t
    saved = torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]
    assert torch.equal(saved["head.weight"], model.head.weight.detach())
    # The listeners see the same Trainer events as with a local pool, and one end.
    assert [e["event"] for e in events] == [e["event"] for e in local_events]
    assert events[-1] == {"event": "end", "fn": "fit", "interrupted": False, "error": None}


def test_second_fit_continues_and_predict_returns_every_rank_in_order(server: RunningServer, mymod: ModuleType) -> None:
    model = mymod.Model()
    t = trainer(PoolStrategy(server=url(server)), max_epochs=1)
    t.fit(model, mymod.loader())
    assert t.global_step == STEPS_PER_EPOCH
    t.fit_loop.max_epochs = 3
    t.fit(model, mymod.loader())
    assert t.current_epoch == 3 and t.global_step == 3 * STEPS_PER_EPOCH
    single = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    expected = single.predict(model, mymod.loader(n=21))
    got = t.predict(model, mymod.loader(n=21))
    assert [b.shape for b in got] == [(8, 1), (8, 1), (5, 1)]
    assert torch.allclose(torch.cat(got), torch.cat(expected))
    assert t.validate(model, mymod.loader(), verbose=False)[0].keys() == {"val_loss"}


def test_a_rank_error_raises_worker_error_with_the_remote_traceback(server: RunningServer, mymod: ModuleType) -> None:
    t = trainer(PoolStrategy(server=url(server)), max_epochs=1)
    with pytest.raises(WorkerError) as caught:
        t.fit(mymod.Model(fail_on_rank1=True), mymod.loader())
    assert caught.value.rank == 1 and caught.value.exc_type == "ValueError"
    assert "bad batch on rank 1" in caught.value.message
    assert "training_step" in caught.value.remote_traceback
    t2 = trainer(PoolStrategy(server=url(server)), max_epochs=1)  # the server's pool serves the next call
    t2.fit(mymod.Model(), mymod.loader())
    assert t2.global_step == STEPS_PER_EPOCH


def test_ctrl_c_cancels_the_job_and_brings_back_the_state_so_far(server: RunningServer, mymod: ModuleType) -> None:
    """A KeyboardInterrupt in the client (here raised from an on_event listener, where a real
    Ctrl-C often lands) cancels the server's job; the ranks stop at one batch and the state so far
    is applied, with the pool still warm."""
    pressed = []

    def ctrl_c_at_step_6(event: dict[str, Any]) -> None:
        if event["event"] == "train_batch" and event["step"] >= 6 and not pressed:
            pressed.append(time.monotonic())
            raise KeyboardInterrupt

    t = trainer(PoolStrategy(server=url(server), on_event=ctrl_c_at_step_6), max_epochs=500)
    t.fit(mymod.Model(), mymod.loader())
    stopped = time.monotonic() - pressed[0]
    assert 6 <= t.global_step < 500 * STEPS_PER_EPOCH and t.state.status.name == "INTERRUPTED"
    assert stopped < 10, f"the ranks took {stopped:.1f} s to stop"
    t2 = trainer(PoolStrategy(server=url(server)), max_epochs=1)
    t2.fit(mymod.Model(), mymod.loader())
    assert t2.global_step == STEPS_PER_EPOCH


def test_a_rank_that_dies_raises_worker_died_error(server: RunningServer, mymod: ModuleType) -> None:
    t = trainer(PoolStrategy(server=url(server)), max_epochs=1)
    with pytest.raises(WorkerDiedError) as caught:
        t.fit(mymod.Model(die_on_rank1=True), mymod.loader())
    assert caught.value.rank == 1 and caught.value.exitcode == 3
    t2 = trainer(PoolStrategy(server=url(server)), max_epochs=1)  # the server's pool recovered
    t2.fit(mymod.Model(), mymod.loader())
    assert t2.global_step == STEPS_PER_EPOCH
