"""PoolStrategy with the standalone ``pytorch_lightning`` package's Trainer (issue: PoolStrategy, item 1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightdist.pytorch_lightning as lpl
from tests.conftest import shared_lightning_pool


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def shared_pool() -> Iterator[None]:
    with shared_lightning_pool(lpl.strategy, lpl.TrainerWorker, "pytorch_lightning"):
        yield


def test_pytorch_lightning_trainer_fits_on_the_pool() -> None:
    pids = []
    for _ in range(2):
        model = Regressor()
        before = model.layer.weight.detach().clone()
        t = pl.Trainer(
            strategy="lightdist",
            accelerator="cpu",
            devices=2,
            max_epochs=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        assert isinstance(t.strategy, lpl.PoolStrategy)
        assert isinstance(t.strategy, pl.strategies.DDPStrategy)
        t.fit(model, loader())
        assert t.global_step == 4 and "loss" in t.callback_metrics
        assert not torch.equal(before, model.layer.weight.detach())
        pids.append(t.strategy.pool().pids)
    assert pids[0] == pids[1]


def test_the_two_flavours_are_distinct_classes() -> None:
    """pytorch_lightning's Trainer needs this flavour; lightning.pytorch's needs lightdist.lightning's."""
    from lightdist.lightning import PoolStrategy as UnifiedPoolStrategy

    assert lpl.PoolStrategy is not UnifiedPoolStrategy
    assert lpl.PoolStrategy.__module__ == "lightdist.pytorch_lightning.strategy"
    with pytest.raises(Exception, match="strategy"):
        pl.Trainer(strategy=UnifiedPoolStrategy(), accelerator="cpu", devices=2)
