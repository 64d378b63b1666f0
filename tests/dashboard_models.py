"""A model for the dashboard's browser tests (``--model tests.dashboard_models.Steady``): steady
steps, a metric whose name is markup, and an optional failure whose message is markup too."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

HOSTILE = '<img src=x onerror="window.__pwned=1">'


class Steady(pl.LightningModule):
    def __init__(self, step_sleep: float = 0.0, fail_at_step: int = -1, hostile_metric: bool = False) -> None:
        super().__init__()
        self.step_sleep = step_sleep
        self.fail_at_step = fail_at_step
        self.hostile_metric = hostile_metric
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_sleep)
        if self.global_step == self.fail_at_step:
            raise RuntimeError(f"failed on purpose: {HOSTILE}")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, prog_bar=True)
        if self.hostile_metric:
            self.log(HOSTILE, loss * 2)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)
