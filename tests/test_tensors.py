"""Tensors out of band (``lightdist._tensors``), on real pools: shared memory on one host, signed
frames otherwise; and models that stay on the ranks between Lightning calls (``lightdist._resident``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightdist import DistributedRunner, DistributedWorker, WorkerError
from lightdist.errors import ProtocolError
from lightdist.lightning import TrainerWorker
from lightdist.lightning import strategy as strategy_module
from lightdist.protocol import Kind, Session
from tests.conftest import descendants, pid_alive, shared_lightning_pool, wait_until


class Keeper(DistributedWorker):
    """Returns what it got (doubled), and keeps the last payload to show that mapped pages are shared."""

    def __call__(self, streaming: bool = False, **payload: Any) -> Any:
        if payload.get("hold") is not None:
            self.held = payload["hold"]
            return None
        if payload.get("write") is not None:
            payload["write"].add_(1)  # a private copy-on-write page: the driver's tensor must not change
            return float(payload["write"].sum())
        x = payload["x"]
        return {"double": x * 2, "same": x, "views": payload.get("views"), "param": payload.get("param")}


@pytest.fixture(scope="module", params=["auto", "frames"])
def keeper(request: pytest.FixtureRequest) -> Iterator[DistributedRunner]:
    runner = DistributedRunner(Keeper, world_size=2, tensor_transport=request.param)
    runner.start_sync(timeout=120)
    yield runner
    runner.stop_sync()


def test_tensors_round_trip_with_views_and_parameters(keeper: DistributedRunner) -> None:
    x = torch.arange(12.0).reshape(3, 4)
    param = torch.nn.Parameter(torch.ones(3))
    out = keeper.invoke_sync({"x": x, "views": [x, x[1:, 2:]], "param": param}, timeout=60)
    assert torch.equal(out["double"], x * 2) and torch.equal(out["same"], x)
    a, b = out["views"]
    assert torch.equal(b, x[1:, 2:])
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one storage, as sent
    assert isinstance(out["param"], torch.nn.Parameter) and out["param"].requires_grad


def test_a_large_tensor_travels_outside_the_pickle(keeper: DistributedRunner) -> None:
    x = torch.randn(16 << 20)  # 64 MB
    before = keeper.transfer_stats()
    out = keeper.invoke_sync({"x": x}, timeout=120)
    after = keeper.transfer_stats()
    assert torch.equal(out["double"], x * 2)
    assert after["tensor_bytes_sent"] - before["tensor_bytes_sent"] == x.nbytes  # once, not once per rank
    assert after["pickle_bytes_sent"] - before["pickle_bytes_sent"] < 10_000
    assert after["tensor_bytes_received"] - before["tensor_bytes_received"] == 2 * x.nbytes  # double, same


def test_a_rank_writing_its_copy_never_changes_the_drivers(keeper: DistributedRunner) -> None:
    x = torch.zeros(1000)
    assert keeper.invoke_sync({"write": x}, timeout=60) == 1000.0
    assert float(x.sum()) == 0.0


def test_plain_data_skips_the_tensor_pickler_and_tensors_still_go_out_of_band() -> None:
    from lightdist import _tensors

    plain = {"lr": 1e-3, "tags": ["a", "b"], "shape": (3, 4), "blob": b"x", "none": None, 7: True}
    out = _tensors.encode(plain, _tensors.SHM)
    assert out.manifest["records"] == [] and not out.memfiles
    assert _tensors.decode(out.data, out.manifest) == plain
    nested = {"cfg": plain, "deep": [[{"x": torch.ones(3)}]]}  # one tensor deep inside: not plain
    out = _tensors.encode(nested, _tensors.FRAMES)
    assert len(out.manifest["records"]) == 1
    assert torch.equal(_tensors.decode(out.data, out.manifest, out.buffers)["deep"][0][0]["x"], torch.ones(3))
    loop: list[Any] = []
    loop.append(loop)  # self-referencing: the scan stops at its item budget, cloudpickle copes
    out = _tensors.encode(loop, _tensors.SHM)
    back = _tensors.decode(out.data, out.manifest)
    assert back[0] is back


def test_a_forged_tensor_frame_is_refused() -> None:
    key = os.urandom(32)
    driver, rank = Session(key, "driver", -1), Session(key, "r0", 0)
    tensor = torch.arange(1000, dtype=torch.float32)
    frames = driver.pack(Kind.CALL, 1, [b"envelope", b"pickle", memoryview(tensor.numpy()).cast("B")])
    assert rank.unpack(frames).payload[2] == tensor.numpy().tobytes()
    forged = driver.pack(Kind.CALL, 2, [b"envelope", b"pickle", tensor.numpy().tobytes()])
    altered = bytearray(forged[-1])
    altered[100] ^= 1  # one bit of one weight
    with pytest.raises(ProtocolError, match="bad signature"):
        rank.unpack([*forged[:-1], bytes(altered)])


def _lightdist_memfds(pid: int) -> list[str]:
    found = []
    for path in (Path(f"/proc/{pid}/fd"), Path(f"/proc/{pid}/map_files")):
        try:
            entries = list(path.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if "memfd:lightdist-call" in target:
                found.append(f"{pid}:{entry.name}")
    return found


_DRIVER = textwrap.dedent(
    """
    import sys, time, torch
    from lightdist import DistributedRunner, DistributedWorker

    class Hold(DistributedWorker):
        def __call__(self, streaming=False, x=None):
            self.x = x            # a mapped, shared storage: the memfd lives while the rank holds it
            return None

    runner = DistributedRunner(Hold, world_size=2)
    runner.start_sync(timeout=120)
    runner.invoke_sync({"x": torch.ones(1 << 20)}, timeout=60)
    print("PIDS", *runner.pids.values(), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("victim", ["driver", "rank"])
def test_no_shared_memory_outlives_a_sigkill(tmp_path: Path, victim: str) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line
        ranks = [int(p) for p in line.split()[1:]]
        tree = descendants(proc.pid) | {proc.pid}
        assert any(_lightdist_memfds(pid) for pid in ranks)  # the ranks map the call's memfd
        if victim == "rank":
            os.kill(ranks[0], signal.SIGKILL)
            assert wait_until(lambda: not _lightdist_memfds(ranks[0]), 10)
            assert not _lightdist_memfds(proc.pid)  # the driver closed its descriptor after the call
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_until(lambda: not any(pid_alive(pid) for pid in tree), 15)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert set(os.listdir("/dev/shm")) == shm_before  # nothing by name, ever
    assert not [p for p in tree if _lightdist_memfds(p)]


# --- models that stay on the ranks --------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _lightning_pool() -> Iterator[None]:
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        yield


class Stack(L.LightningModule):
    def __init__(self, width: int = 64, layers: int = 3, frozen: bool = False) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
        self.norm = torch.nn.BatchNorm1d(width)  # buffers that training changes
        self.register_buffer("mask", torch.ones(width))  # a buffer that training leaves alone
        if frozen:
            self.layers[:-1].requires_grad_(False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.norm(self.layers(x)) * self.mask, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layers(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(0)
        width = self.layers[0].in_features
        return DataLoader(
            TensorDataset(torch.randn(64, width, generator=gen), torch.randn(64, width, generator=gen)), batch_size=8
        )

    val_dataloader = train_dataloader


class SaveRankZero(Callback):
    """Rank 0 saves its model's state_dict at the end of fit, to compare with the driver's."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}, self.path)


def fit(model: L.LightningModule, callbacks: list[Callback] | None = None) -> L.Trainer:
    trainer = L.Trainer(
        strategy="lightdist",
        accelerator="cpu",
        devices=2,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        callbacks=callbacks or [],
    )
    trainer.fit(model)
    return trainer


def stats() -> dict[str, int]:
    return strategy_module._pools[(2, "cpu")].transfer_stats()


def delta(before: dict[str, int]) -> dict[str, int]:
    after = stats()
    return {k: after[k] - before[k] for k in after}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_the_drivers_model_equals_rank_zeros_after_fit(tmp_path: Path) -> None:
    model = Stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, [SaveRankZero(tmp_path / "rank0.pt")])
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    driver = model.state_dict()
    assert rank0.keys() == driver.keys()
    for name in driver:
        assert torch.equal(driver[name], rank0[name]), name
    assert not torch.equal(before["layers.0.weight"], driver["layers.0.weight"])  # it did train


def test_an_unchanged_model_is_not_sent_again() -> None:
    model = Stack()
    first = stats()
    fit(model)
    sent_first = delta(first)
    assert sent_first["tensor_bytes_sent"] == nbytes(*model.state_dict().values())
    again = stats()
    trainer = fit(model)  # a new Trainer, the same model
    assert delta(again)["tensor_bytes_sent"] == 0
    assert delta(again)["tensors_resident"] == len(model.state_dict())
    more = stats()
    trainer.fit(model, ckpt_path=None)  # a second fit on the same Trainer continues
    trainer.validate(model, verbose=False)
    assert delta(more)["tensor_bytes_sent"] == 0
    assert delta(more)["calls"] == 2


def test_only_the_tensors_the_driver_changed_are_sent() -> None:
    model = Stack()
    fit(model)
    before = stats()
    with torch.no_grad():
        model.layers[1].weight.mul_(0.5)  # an in-place write: the version counter moves
    model.layers[2].weight.data.fill_(0.01)  # through .data: the version does not, the bytes do
    fit(model)
    moved = delta(before)
    assert moved["tensors_sent"] == 2
    assert moved["tensor_bytes_sent"] == nbytes(model.layers[1].weight, model.layers[2].weight)


def test_frozen_weights_and_unchanged_buffers_never_travel_back(tmp_path: Path) -> None:
    model = Stack(frozen=True)
    frozen = model.layers[0].weight.detach().clone()
    before = stats()
    fit(model, [SaveRankZero(tmp_path / "rank0.pt")])
    back = delta(before)
    trained = [model.layers[2].weight, model.norm.weight, model.norm.bias]
    changed_buffers = [model.norm.running_mean, model.norm.running_var, model.norm.num_batches_tracked]
    assert back["tensor_bytes_received"] == nbytes(*trained, *changed_buffers)  # no frozen layer, no mask
    assert torch.equal(model.layers[0].weight, frozen)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, rank0[name]), name


def test_a_new_model_per_fit_is_sent_whole_and_the_old_one_dropped() -> None:
    for _ in range(3):  # a sweep's pattern: every fit a new model object
        model = Stack()
        before = stats()
        fit(model)
        assert delta(before)["tensors_resident"] == 0
        assert delta(before)["tensor_bytes_sent"] == nbytes(*model.state_dict().values())


class Rows(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return Stack().train_dataloader()


def test_a_datamodule_reused_across_trainers_does_not_carry_the_old_model() -> None:
    # Lightning points the datamodule (and the model) at the Trainer only inside _fit_impl, which
    # runs on the ranks: until then they still point at the previous Trainer and its model.
    data = Rows()
    for _ in range(3):
        model = Stack()
        before = stats()
        trainer = L.Trainer(
            strategy="lightdist",
            accelerator="cpu",
            devices=2,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=data)
        moved = delta(before)
        assert moved["tensors_resident"] == 0  # nothing of an earlier model was even named
        assert moved["tensors_sent"] == len(model.state_dict())
        assert data.trainer is trainer and model.trainer is trainer


def _mapping_of(tensor: torch.Tensor) -> tuple[str, int, int]:
    """(file, Rss kB, Pss kB) of this process's mapping that holds ``tensor``'s bytes."""
    address = tensor.untyped_storage().data_ptr()
    found: tuple[str, int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            if found is not None:
                break
            low, high = (int(x, 16) for x in head[0].split("-"))
            if low <= address < high:
                found = (head[5] if len(head) > 5 else "", 0, 0)
        elif found is not None and head[0] in ("Rss:", "Pss:"):
            found = (found[0], int(head[1]), found[2]) if head[0] == "Rss:" else (found[0], found[1], int(head[1]))
    assert found is not None
    return found


def _memfd_inodes() -> set[int]:
    inodes = set()
    for folder in ("/proc/self/fd", "/proc/self/map_files"):
        for entry in Path(folder).iterdir():
            try:
                if "memfd:lightdist-call" in os.readlink(entry):
                    inodes.add(os.stat(entry).st_ino)
            except OSError:
                continue
    return inodes


def test_the_driver_keeps_one_copy_of_a_model_it_sent_and_frees_it_with_the_model() -> None:
    import gc

    before = _memfd_inodes()
    model = Stack(width=512)
    fit(model)
    # The driver's weights were moved onto the memfd the ranks read: no second, private copy. Small
    # storages (under 1 MiB: the norm's 512 floats) stay where they were.
    moved = {name for name, t in model.state_dict().items() if "memfd:lightdist-call" in _mapping_of(t)[0]}
    assert moved == {f"layers.{i}.weight" for i in range(3)}
    assert _memfd_inodes() - before
    del model
    gc.collect()
    assert _memfd_inodes() <= before  # its pages and the descriptor went with the model


def test_a_tensor_viewed_elsewhere_is_not_moved_and_still_aliases() -> None:
    model = Stack(width=512)
    view = model.layers[0].weight.data  # held elsewhere (an optimizer's, the user's): moving it would split them
    fit(model)
    assert "memfd" not in _mapping_of(model.layers[0].weight)[0]
    assert "memfd:lightdist-call" in _mapping_of(model.layers[1].weight)[0]
    view.fill_(0.5)
    assert bool((model.layers[0].weight == 0.5).all())  # still one tensor, trained in place


def test_weights_numpy_owns_are_not_moved() -> None:
    import numpy as np

    array = np.zeros((512, 512), dtype=np.float32)
    model = Stack(width=512)
    model.layers[0].weight = torch.nn.Parameter(torch.from_numpy(array))  # numpy's bytes, not torch's
    fit(model)
    assert "memfd" not in _mapping_of(model.layers[0].weight)[0]
    assert np.shares_memory(array, model.layers[0].weight.detach().numpy())  # trained in place, still numpy's


def test_a_forked_child_dropping_the_model_leaves_the_drivers_pages_alone() -> None:
    model = Stack(width=512)
    fit(model)
    weight = model.layers[1].weight
    assert "memfd:lightdist-call" in _mapping_of(weight)[0]
    expected = weight.detach().clone()
    pid = os.fork()
    if pid == 0:  # the child: drop its copy of the model (a DataLoader worker might), then leave
        try:
            import gc

            del model, weight
            gc.collect()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(weight, expected)  # not zeros: only the driver's own drop frees the pages


def test_frozen_weights_exist_once_on_the_host() -> None:
    model = Stack(width=512, frozen=True)
    fit(model)
    name, rss, pss = _mapping_of(model.layers[0].weight)
    # 512 x 512 float32 = 1 MiB mapped; a few pages may be out of memory (seen: 1012 KiB resident on
    # a machine running proactive reclaim), so resident means "nearly all of it".
    assert "memfd:lightdist-call" in name and rss >= 900
    assert pss <= rss / 2.5  # the driver and both ranks map the same pages (PSS splits them three ways)


class FailOnRankOne(Stack):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1:
            raise RuntimeError("boom on rank 1")
        return super().training_step(batch, batch_idx)


def test_after_a_failed_call_everything_is_sent_again() -> None:
    model = Stack()
    fit(model)
    bad = FailOnRankOne()
    bad.load_state_dict(model.state_dict())
    with pytest.raises(WorkerError, match="boom on rank 1"):
        fit(bad)
    before = stats()
    fit(model)  # the ranks' copies were in doubt: resent, and the fit works
    assert delta(before)["tensors_resident"] == 0
    assert delta(before)["tensor_bytes_sent"] == nbytes(*model.state_dict().values())
