"""``lightdist tensorboard`` / ``lightdist view``: the real console script serves a finished fit's
TensorBoard logs over TensorBoard's HTTP API, stops cleanly on SIGINT/SIGTERM, leaves no process."""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightdist.cli._tensorboard import view_hint
from lightdist.lightning import TrainerWorker
from lightdist.lightning import strategy as strategy_module
from tests.cli_helpers import LIGHTDIST, Board, poll_json
from tests.conftest import descendants, shared_lightning_pool

EPOCHS, STEPS_PER_EPOCH = 2, 4  # 64 samples, batch 8, 2 ranks
VAL_ACC = [0.25, 0.5]  # what the module logs as val_acc after epochs 0 and 1 (exact in float32)


class Demo(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_acc", VAL_ACC[self.current_epoch], sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


@dataclass
class Run:
    save_dir: Path  # what `--logdir` gets: the run shows as "demo/version_0"
    log_dir: Path  # the version folder rank 0 wrote
    train_loss: list[tuple[int, float]]  # (step, value) as TensorBoard's own reader finds them in the file


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One real fit on the shared 2-rank pool, logging with a TensorBoardLogger; the pool is stopped
    before the module ends."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save_dir = tmp_path_factory.mktemp("tb") / "runs"
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        logger = TensorBoardLogger(save_dir, name="demo")
        trainer = L.Trainer(
            strategy="lightdist",
            accelerator="cpu",
            devices=2,
            max_epochs=EPOCHS,
            logger=logger,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Demo(), loader(), loader())
        log_dir = Path(logger.log_dir)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    recorded = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert len(recorded) == EPOCHS * STEPS_PER_EPOCH and len({v for _, v in recorded}) > 1
    yield Run(save_dir, log_dir, recorded)


def test_tensorboard_serves_the_fits_scalars_and_stops_on_ctrl_c(run: Run, tmp_path: Path) -> None:
    board = Board("tensorboard", "--logdir", run.save_dir, stderr=tmp_path / "stderr")
    try:
        url = board.url()
        assert url.startswith("http://127.0.0.1:"), "loopback unless --host says otherwise"
        assert poll_json(url + "data/runs", None, lambda runs: "demo/version_0" in runs) == ["demo/version_0"]
        tags = poll_json(url + "data/plugin/scalars/tags", None, lambda t: "demo/version_0" in t)
        assert {"train_loss", "val_acc"} <= set(tags["demo/version_0"])
        # [wall_time, step, value] rows: the same pairs TensorBoard's reader found in the event file
        params = {"run": "demo/version_0", "tag": "train_loss"}
        rows = poll_json(url + "data/plugin/scalars/scalars", params, lambda r: len(r) >= len(run.train_loss))
        assert [(step, value) for _, step, value in rows] == run.train_loss
        params["tag"] = "val_acc"
        rows = poll_json(url + "data/plugin/scalars/scalars", params, lambda r: len(r) >= len(VAL_ACC))
        assert [value for _, _, value in rows] == VAL_ACC
        assert not descendants(board.proc.pid), "the pure Python loader starts no tensorboard-data-server"
        assert board.stop(signal.SIGINT) == 0
    finally:
        board.kill()
    assert "Traceback" not in (tmp_path / "stderr").read_text()


def test_view_alias_serves_the_hinted_dir_and_stops_on_sigterm(run: Run, tmp_path: Path) -> None:
    """view_hint names the logger's root dir, so each version is a run; `view` is the same command."""
    hint = view_hint(run.log_dir)
    assert str(run.log_dir) in hint
    command = shlex.split(hint.split("watch them live with: ", 1)[1])
    assert command[:3] == ["lightdist", "tensorboard", "--logdir"] and len(command) == 4
    assert Path(command[3]) == run.save_dir / "demo" and Path(command[3]).is_dir()
    board = Board("view", *command[2:], stderr=tmp_path / "stderr")
    try:
        url = board.url()
        assert poll_json(url + "data/runs", None, lambda runs: bool(runs)) == ["version_0"]
        assert board.stop(signal.SIGTERM) == 0
    finally:
        board.kill()


def test_missing_logdir_and_busy_port_are_one_line_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-runs"
    proc = subprocess.run(
        [str(LIGHTDIST), "view", "--logdir", str(missing)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr and "does not exist" in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        proc = subprocess.run(
            [str(LIGHTDIST), "tensorboard", "--logdir", str(tmp_path), "--port", port],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and port in proc.stderr and "in use" in proc.stderr, proc.stderr
