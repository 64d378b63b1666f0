"""Small Lightning models for server tests, importable by the server's job and its ranks
(``--model tests.server_models.Tiny``; jobs run with the repository root as their directory)."""

from __future__ import annotations

import os
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Tiny(pl.LightningModule):
    """A linear regression; ``step_sleep`` seconds per training step (from step ``sleep_from_step``
    on; with ``sleep_until_resumed`` only in a fit that did not resume from a checkpoint) make a job
    last long enough to cancel or kill it mid-run; ``die_at_step`` makes rank 1 exit
    (as an OOM kill would); ``fail_at_step`` makes rank 1 raise a RuntimeError (a bug in the model)."""

    def __init__(
        self,
        lr: float = 0.05,
        step_sleep: float = 0.0,
        sleep_from_step: int = 0,
        die_at_step: int = -1,
        fail_at_step: int = -1,
        sleep_until_resumed: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        resumed = self.hparams.sleep_until_resumed and self.trainer.ckpt_path is not None
        if self.hparams.step_sleep and self.global_step >= self.hparams.sleep_from_step and not resumed:
            time.sleep(self.hparams.step_sleep)
        if self.global_step == self.hparams.die_at_step and self.global_rank == 1:
            os._exit(3)
        if self.global_step == self.hparams.fail_at_step and self.global_rank == 1:
            raise RuntimeError(f"Tiny fails at step {self.global_step} on rank 1")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y), sync_dist=True)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyData(pl.LightningDataModule):
    def __init__(self, size: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(size, 4, generator=generator)
        self.data = TensorDataset(x, x.sum(dim=1, keepdim=True))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)
