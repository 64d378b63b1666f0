"""PoolStrategy(server=URL): a Trainer call encoded by the client, run by a server on its pool, applied back.

Real Trainers on a real 2-rank gloo pool. ``Loopback`` replaces only the HTTP hop of
``RemoteRunner`` (encode → bytes → ``execute_call`` on the pool → bytes → decode), so these tests
check what the server's job thread and the client do with the bytes. The model comes from a
``mymod.py`` in a temporary directory that the "server" side cannot import (it is dropped from
``sys.modules`` and ``sys.path`` while the call runs there): it must travel by value.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightdist import WorkerDiedError, WorkerError, _byvalue
from lightdist.lightning import PoolStrategy, TrainerWorker
from lightdist.lightning import strategy as strategy_module
from lightdist.lightning._remote import RemoteRunner
from lightdist.lightning._remote_call import (
    RemoteCallError,
    call_header,
    decode_call,
    decode_result,
    encode_call,
    error_from_record,
    error_record,
    execute_call,
)
from lightdist.runner import DistributedRunner
from tests.conftest import shared_lightning_pool
from tests.test_lightning import trainer as lightning_trainer

STEPS_PER_EPOCH = 4  # 64 samples, batch 8, 2 ranks

MYMOD = '''
import torch
import lightning as L
from torch.utils.data import DataLoader, TensorDataset


def loader(n=64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class Model(L.LightningModule):
    """A frozen layer (never written: it must not travel back) and a trained head."""

    def __init__(self, fail_on_rank1=False, die_on_rank1=False):
        super().__init__()
        self.save_hyperparameters()
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.frozen(x) + x)

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_on_rank1 and self.global_rank == 1 and batch_idx == 2:
            raise ValueError("bad batch on rank 1")
        if self.hparams.die_on_rank1 and self.global_rank == 1 and batch_idx == 2:
            import os

            os._exit(3)
        loss = torch.nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return loader()

    def val_dataloader(self):
        return loader()
'''


@pytest.fixture(scope="module", autouse=True)
def shared_pool() -> Iterator[None]:
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        yield


@pytest.fixture()
def mymod(tmp_path: Path) -> Iterator[ModuleType]:
    """``mymod.py`` in a directory of its own, on sys.path for the client only."""
    (tmp_path / "mymod.py").write_text(MYMOD)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("mymod")
    finally:
        sys.modules.pop("mymod", None)
        sys.path.remove(str(tmp_path))


@pytest.fixture()
def restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """seed_everything sets these in the driver; put them back after the test."""
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


@contextlib.contextmanager
def without_module(name: str) -> Iterator[None]:
    """As on a server that never had ``name``: not imported, and not importable from sys.path."""
    module = sys.modules.pop(name, None)
    saved = list(sys.path)
    if module is not None and module.__file__:
        folder = os.path.dirname(module.__file__)
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(folder)]
    try:
        with pytest.raises(ImportError):
            importlib.import_module(name)
        yield
    finally:
        sys.path[:] = saved
        if module is not None:
            sys.modules[name] = module


class Loopback(RemoteRunner):
    """``RemoteRunner`` with the HTTP hop replaced by the server's side, run in this process."""

    def __init__(self, runner: DistributedRunner, hidden: str = "mymod") -> None:
        super().__init__("http://loopback.invalid")
        self.runner = runner
        self.hidden = hidden
        self.events: list[dict[str, Any]] = []
        self.weights_sent_back: list[set[str]] = []
        self.on_server_event: Callable[[dict[str, Any]], None] | None = None

    def attach(self) -> dict[str, Any]:
        return {"world_size": self.runner.world_size, "accelerator": "cpu", "nodes": 1, "state": "ready"}

    def invoke_interruptible(
        self, payload: dict[str, Any], on_item: Callable[[Any], None] | None = None, resident: bool = False
    ) -> tuple[Any, bool]:
        blob = encode_call(payload)
        assert call_header(blob).cwd == os.getcwd()

        def on_event(event: dict[str, Any]) -> None:
            self.events.append(event)
            if self.on_server_event is not None:
                self.on_server_event(event)
            if on_item is not None and event["event"] != "end":
                on_item(event)

        with without_module(self.hidden):
            result, _ = execute_call(blob, self.runner, on_event)
        out, interrupted = decode_result(result)
        if out is not None and out["weights"] is not None:
            self.weights_sent_back.append(set(out["weights"]))
        return out, interrupted


def local_runner() -> DistributedRunner:
    return strategy_module._pools[(2, "cpu")]


def trainer(strategy: Any = "lightdist", **kwargs: Any) -> L.Trainer:
    return lightning_trainer(strategy=strategy, **kwargs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- which modules travel by value ---------------------------------------------------------------


def test_user_modules_are_the_callers_own_pure_python_modules(mymod: ModuleType) -> None:
    names = {m.__name__ for m in _byvalue.user_modules()}
    assert "mymod" in names and "tests" in names  # a temp dir and this checkout: not installed
    assert not names & {"lightdist", "torch", "lightning", "json", "cloudpickle", "__main__", "sys"}
    blob = _byvalue.dumps(mymod.Model)
    assert b"mymod" in blob and "mymod" not in __import__("cloudpickle").list_registry_pickle_by_value()
    with without_module("mymod"):
        assert __import__("cloudpickle").loads(blob) is mymod.Model  # by value: nothing imported


def test_a_package_with_a_compiled_extension_goes_by_reference(tmp_path: Path) -> None:
    package = tmp_path / "withext"
    package.mkdir()
    (package / "__init__.py").write_text("")
    sys.modules["withext"] = module = ModuleType("withext")
    module.__file__ = str(package / "__init__.py")
    sys.modules["withext._fast"] = ext = ModuleType("withext._fast")
    ext.__file__ = str(package / "_fast.cpython-311-x86_64-linux-gnu.so")
    try:
        assert "withext" not in {m.__name__ for m in _byvalue.user_modules()}
        del sys.modules["withext._fast"]
        assert "withext" in {m.__name__ for m in _byvalue.user_modules()}
    finally:
        sys.modules.pop("withext", None)
        sys.modules.pop("withext._fast", None)


# --- the call's bytes ----------------------------------------------------------------------------


def test_the_header_is_read_without_unpickling_and_versions_must_match(mymod: ModuleType) -> None:
    t = trainer(strategy=PoolStrategy(runner=Loopback(local_runner())))
    t.state.fn = __import__("lightning.pytorch.trainer.states", fromlist=["TrainerFn"]).TrainerFn.FITTING
    blob = encode_call({"job": (t, t._fit_impl, {"model": mymod.Model()}), "env": {}, "flags": {}})
    header = call_header(blob)
    assert header.cwd == os.getcwd() and header.command == "fit"
    assert set(header.versions) == {"python", "torch", "lightdist", "lightning"}
    assert decode_call(blob)[1]["job"][0].state.fn.value == "fit"
    head_len = int.from_bytes(blob[17:21], "big")
    other = blob.replace(b'"torch": "', b'"torch": "0.0+', 1)
    other = other[:17] + (head_len + 4).to_bytes(4, "big") + other[21:]
    with pytest.raises(ValueError, match=r"the client runs torch 0\.0\+.* but the server"):
        decode_call(other)
    with pytest.raises(ValueError, match="not a lightdist call"):
        call_header(b"\x80\x05junk")


def test_errors_travel_as_records() -> None:
    worker = error_from_record(error_record(WorkerError(1, "ValueError", "bad batch", "Traceback ...\n")))
    assert isinstance(worker, WorkerError) and (worker.rank, worker.exc_type, worker.message) == (
        1,
        "ValueError",
        "bad batch",
    )
    died = error_from_record(error_record(WorkerDiedError(0, None, 9, "during fit")))
    assert isinstance(died, WorkerDiedError) and (died.rank, died.exitcode, died.signal, died.detail) == (
        0,
        None,
        9,
        "during fit",
    )
    try:
        raise KeyError("no such thing")
    except KeyError as exc:
        record = error_record(exc)
    import json

    other = error_from_record(json.loads(json.dumps(record)))
    assert isinstance(other, RemoteCallError) and other.exc_type == "KeyError" and "no such thing" in str(other)
    assert "raise KeyError" in other.remote_traceback
    # The server's CLI-job form (no "raised"): a rank number means a rank raised.
    cli_form = {"type": "ValueError", "message": "m", "traceback": "t", "rank": 0}
    assert isinstance(error_from_record(cli_form), WorkerError)


# --- through execute_call on a real pool ---------------------------------------------------------


def test_fit_on_the_server_leaves_the_driver_as_a_local_fit_does(
    mymod: ModuleType, tmp_path: Path, restore_env: None
) -> None:
    """Same seed and data: the weights, step, metrics, checkpoints and logger equal a local pool's."""
    runs = {}
    for kind in ("local", "server"):
        L.seed_everything(0)
        model = mymod.Model()
        frozen_before = model.frozen.weight.detach().clone()
        root = tmp_path / kind
        checkpoint = ModelCheckpoint(dirpath=root / "ckpts", monitor="val_loss", save_last=True)
        remote = Loopback(local_runner())
        strategy = "lightdist" if kind == "local" else PoolStrategy(runner=remote)
        t = trainer(
            strategy, logger=TensorBoardLogger(root, name="runs"), callbacks=[checkpoint], enable_checkpointing=True
        )
        t.fit(model, datamodule=mymod.Data())
        runs[kind] = (t, model, checkpoint, remote)
        assert torch.equal(model.frozen.weight, frozen_before)
    (local, local_model, local_ckpt, _), (t, model, ckpt, remote) = runs["local"], runs["server"]
    assert all(torch.equal(a, b) for a, b in zip(weights(local_model).values(), weights(model).values()))
    assert not torch.equal(weights(model)["head.weight"], mymod.Model().head.weight)
    assert t.global_step == local.global_step == 2 * STEPS_PER_EPOCH and t.current_epoch == 2
    assert t.state.status.name == "FINISHED" and t.state.fn.name == "FITTING"
    assert t.callback_metrics.keys() == local.callback_metrics.keys() >= {"train_loss", "val_loss"}
    assert torch.equal(t.callback_metrics["val_loss"], local.callback_metrics["val_loss"])
    assert t.logged_metrics.keys() == local.logged_metrics.keys()
    assert set(t.progress_bar_metrics) == {"train_loss"}
    root = tmp_path / "server"
    assert ckpt.dirpath == str(root / "ckpts") and Path(ckpt.best_model_path).is_file()
    assert Path(ckpt.best_model_path).name == Path(local_ckpt.best_model_path).name
    assert torch.equal(ckpt.best_model_score, local_ckpt.best_model_score)
    assert Path(ckpt.last_model_path).is_file() and (root / "runs" / "version_0").is_dir()
    assert model.trainer is t and t.datamodule is not None
    saved = torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]
    assert torch.equal(saved["head.weight"], model.head.weight.detach())
    # Only what training changed came back: the head, never the frozen layer.
    assert remote.weights_sent_back == [{"head.weight", "head.bias"}]
    kinds = [e["event"] for e in remote.events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("train_batch") == 2 * STEPS_PER_EPOCH
    assert remote.events[-1] == {"event": "end", "fn": "fit", "interrupted": False, "error": None}


def test_second_fit_continues_and_predict_returns_every_rank_in_order(mymod: ModuleType) -> None:
    model = mymod.Model()
    remote = Loopback(local_runner())
    t = trainer(PoolStrategy(runner=remote), max_epochs=1)
    t.fit(model, mymod.loader())
    assert t.global_step == STEPS_PER_EPOCH
    after_first = weights(model)
    t.fit_loop.max_epochs = 3
    t.fit(model, mymod.loader())
    assert t.current_epoch == 3 and t.global_step == 3 * STEPS_PER_EPOCH
    assert not torch.equal(after_first["head.weight"], model.head.weight)
    single = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    expected = single.predict(model, mymod.loader(n=21))  # 21 samples over 2 ranks: padded shards
    got = t.predict(model, mymod.loader(n=21))
    assert [b.shape for b in got] == [(8, 1), (8, 1), (5, 1)]
    assert torch.allclose(torch.cat(got), torch.cat(expected))
    # Frozen weights never travel back. (The head does after predict too: the ranks mark trainable
    # parameters written after any call, and predict bumps their version counters on the ranks;
    # a local pool copies them into the driver's model likewise.)
    assert not any(name.startswith("frozen.") for sent in remote.weights_sent_back for name in sent)


def test_a_rank_error_raises_worker_error_with_the_remote_traceback(mymod: ModuleType) -> None:
    remote = Loopback(local_runner())
    t = trainer(PoolStrategy(runner=remote), max_epochs=1)
    with pytest.raises(WorkerError) as caught:
        t.fit(mymod.Model(fail_on_rank1=True), mymod.loader())
    assert caught.value.rank == 1 and caught.value.exc_type == "ValueError"
    assert "bad batch on rank 1" in caught.value.remote_traceback
    assert remote.events[-1]["event"] == "end" and "bad batch" in remote.events[-1]["error"]
    record = error_record(caught.value)
    assert record["rank"] == 1 and "training_step" in record["traceback"]
    # The pool stays usable for the next call.
    t2 = trainer(PoolStrategy(runner=Loopback(local_runner())), max_epochs=1)
    t2.fit(mymod.Model(), mymod.loader())
    assert t2.global_step == STEPS_PER_EPOCH


def test_an_interrupted_call_returns_its_state_so_far(mymod: ModuleType) -> None:
    """What the server's cancel does (runner.interrupt(), not a Ctrl-C in the job's thread): the
    ranks stop at one batch and the driver gets the state reached, with interrupted set."""
    runner = local_runner()
    remote = Loopback(runner)
    seen = threading.Event()

    def interrupt_once(event: dict[str, Any]) -> None:
        if event["event"] == "train_batch" and event["step"] == 6 and not seen.is_set():
            seen.set()
            assert runner.interrupt()  # what the server's cancel calls, from its request thread

    remote.on_server_event = interrupt_once
    t = trainer(PoolStrategy(runner=remote), max_epochs=50)
    t.fit(mymod.Model(), mymod.loader())
    assert seen.is_set() and remote.events[-1]["interrupted"] is True
    assert 6 <= t.global_step < 50 * STEPS_PER_EPOCH
    assert t.state.status.name == "INTERRUPTED"
