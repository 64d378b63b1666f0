"""Fits drawing Lightning's progress bars, for tests/test_progress_bar.py to run in a terminal.

``python tests/bar_script.py STRATEGY`` fits a small model once per bar in :data:`BARS` (a line
``=== NAME ===`` before each), with ``strategy=STRATEGY`` on 2 CPU ranks. With ``ddp`` Lightning
re-runs this script for rank 1, whose bars are disabled; the markers come from rank 0 only.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from torch.utils.data import DataLoader, TensorDataset

import lightdist  # noqa: F401 - registers strategy="lightdist"

STEP_S = 0.05  # long enough for rich's refresh thread to draw the validation bar


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(STEP_S)
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(STEP_S)
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NamedMetrics(TQDMProgressBar):
    """A subclass as users write them: its own metrics (Lightning's documented override)."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("val_loss", None)
        items["epoch_seen"] = trainer.current_epoch
        return items


BARS: dict[str, Any] = {
    "tqdm": lambda: TQDMProgressBar(),
    "rich": lambda: RichProgressBar(),
    "tqdm-subclass": lambda: NamedMetrics(refresh_rate=2, leave=True),
    "rich-theme": lambda: RichProgressBar(
        leave=True, theme=RichProgressBarTheme(metrics_format=".2e", metrics_text_delimiter=" | ")
    ),
}


def loader() -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, 1, generator=gen))
    return DataLoader(data, batch_size=8)


def fit(strategy: str, bar: ProgressBar) -> None:
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
    )
    trainer.fit(Model(), loader(), loader())


def main(strategy: str, names: list[str]) -> None:
    rank_zero = os.environ.get("LOCAL_RANK", "0") == "0"  # ddp runs this script again for rank 1
    for name in names:
        if rank_zero:
            print(f"=== {name} ===", flush=True)
        fit(strategy, BARS[name]())
    if rank_zero:
        print("=== done ===", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(BARS))
