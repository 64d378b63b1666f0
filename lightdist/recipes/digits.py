"""lightdist fit --config digits/pretrain-cpu

Quickstart: pretrain a small CNN on digits 0-4, then fine-tune it on digits 5-9 (scikit-learn's bundled data).

The images are scikit-learn's bundled handwritten digits (1,797 8x8 grey images, shipped inside the
package: nothing is downloaded; ``pip install 'lightdist[recipes]'`` installs it). The quickstart is
two fits and a test, each a config:

    lightdist fit  --config digits/pretrain-cpu      # classes 0-4, from scratch
    lightdist fit  --config digits/finetune-cpu      # classes 5-9, from that checkpoint
    lightdist test --config digits/finetune-cpu \\
        --ckpt_path runs/digits/finetune/checkpoints/last.ckpt     # held-out accuracy

Fine-tuning reuses the pretrained convolutional backbone (``model.pretrained`` names the pretrain
checkpoint) and puts a new head on top for the new classes. It trains on only
``data.train_per_class`` images per class, which is where a pretrained backbone pays off; run the
fine-tune config with ``--model.pretrained=null`` to see the same fit from scratch.

Splits are fixed by ``data.seed`` and stratified per class: ``test_fraction`` of each class is held
out for ``lightdist test`` and never seen by either fit, ``val_fraction`` is the validation set.
``lightdist predict`` returns, per test image, the predicted digit and the true one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightdist.errors import ConfigError

__all__ = ["DigitsClassifier", "DigitsDataModule"]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, restricted to ``classes``, split into train / val / test.

    Args:
        classes: the digits to use; labels are their positions in this list.
        batch_size: per rank.
        val_fraction, test_fraction: share of each class held out for validation and test.
        train_per_class: keep at most this many training images per class (``None``: all).
        seed: fixes the split, identical on every rank and every run.
    """

    def __init__(
        self,
        classes: list[int] = [0, 1, 2, 3, 4],  # noqa: B006 (jsonargparse reads the default)
        batch_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        train_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if importlib.util.find_spec("sklearn") is None:  # found, not imported: that takes seconds
            raise ConfigError(
                "data: the digits recipe reads scikit-learn's bundled digits, and scikit-learn is not "
                "installed: pip install 'lightdist[recipes]'"
            )
        if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
            raise ConfigError(f"data.classes: {classes!r} must be distinct digits between 0 and 9")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in (0, 1) "
                "and leave some data for training"
            )
        if batch_size < 1:
            raise ConfigError(f"data.batch_size: {batch_size} must be at least 1")
        if train_per_class is not None and train_per_class < 1:
            raise ConfigError(f"data.train_per_class: {train_per_class} must be at least 1 (or null for all)")
        self.classes = list(classes)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_per_class = train_per_class
        self.seed = seed
        self.splits: dict[str, TensorDataset] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits  # imported here: only ranks that train need it

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        targets = digits.target
        rng = np.random.default_rng(self.seed)
        parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for _label, digit in enumerate(self.classes):
            index = rng.permutation(np.flatnonzero(targets == digit))
            n_test = round(len(index) * self.test_fraction)
            n_val = round(len(index) * self.val_fraction)
            parts["test"] += index[:n_test].tolist()
            parts["val"] += index[n_test : n_test + n_val].tolist()
            parts["train"] += index[n_test + n_val :][: self.train_per_class].tolist()
        label_of = {digit: label for label, digit in enumerate(self.classes)}
        for name, index_list in parts.items():
            chosen = sorted(index_list)
            labels = torch.tensor([label_of[int(t)] for t in targets[chosen]])
            self.splits[name] = TensorDataset(images[torch.tensor(chosen)], labels)

    def train_dataloader(self) -> DataLoader[Any]:
        # drop_last: a 1-image batch would give BatchNorm a useless batch statistic
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader[Any]:
        return self.test_dataloader()


def _backbone(width: int) -> nn.Sequential:
    # 8x8 -> 8x8 -> 4x4 -> global average: enough capacity for digits, trains in seconds on a CPU
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class DigitsClassifier(pl.LightningModule):
    """A small CNN: a convolutional backbone and a linear head over ``num_classes``.

    Args:
        num_classes: outputs of the head; must equal the number of ``data.classes``.
        width: channels of the first convolution (the backbone's size).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        pretrained: a checkpoint of this recipe (e.g. the pretrain config's ``last.ckpt``) whose
            backbone is loaded; the head is new, so the checkpoint may have other classes.
        freeze_backbone: train only the head (a linear probe of the pretrained features).
    """

    def __init__(
        self,
        num_classes: int = 5,
        width: int = 32,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        pretrained: str | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"model.num_classes: {num_classes} must be at least 2")
        self.save_hyperparameters()
        self.backbone = _backbone(width)
        self.head = nn.Linear(2 * width, num_classes)
        if pretrained is not None:
            self._load_backbone(pretrained, width)
        self.backbone.requires_grad_(not freeze_backbone)

    def _load_backbone(self, path: str, width: int) -> None:
        if not Path(path).is_file():
            raise ConfigError(
                f"model.pretrained: no such checkpoint: {path!r} (run the pretrain config first: "
                "lightdist fit --config digits/pretrain-cpu, or set model.pretrained=null)"
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("hyper_parameters", {}).get("width", 32) != width:
            raise ConfigError(f"model.pretrained: {path!r} was trained with another model.width than {width}")
        prefix = "backbone."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        self.backbone.load_state_dict(state)

    def check_data(self, datamodule: pl.LightningDataModule) -> None:
        """Raise ``ConfigError`` unless this model can train on ``datamodule``.

        ``lightdist fit`` calls it in the driver before any worker starts; ``setup`` calls it too,
        for Trainers run from Python. Data of another recipe (text) has no ``classes`` of digits.
        """
        if not isinstance(getattr(datamodule, "classes", None), list):
            raise ConfigError(
                f"data: {type(datamodule).__module__}.{type(datamodule).__qualname__} has no digit classes: "
                "lightdist.recipes.digits.DigitsClassifier trains on 8x8 digit images "
                "(data: lightdist.recipes.digits.DigitsDataModule)"
            )
        data_classes = len(datamodule.classes)  # type: ignore[attr-defined]
        if data_classes != self.hparams["num_classes"]:
            raise ConfigError(
                f"model.num_classes={self.hparams['num_classes']} but data.classes has {data_classes} "
                "classes: make them agree"
            )

    def setup(self, stage: str) -> None:
        # Checked here rather than in __init__: only now are model and data known together.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.check_data(datamodule)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone(images))
        return logits

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        self.log(f"{stage}_acc", accuracy, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> list[dict[str, int]]:
        images, labels = batch
        predicted = self(images).argmax(-1)
        # report digits, not head positions: classes 5-9 are heads 0-4 after fine-tuning
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "classes", list(range(self.hparams["num_classes"])))
        return [{"predicted": classes[int(p)], "label": classes[int(t)]} for p, t in zip(predicted, labels)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
