"""Models for CLI tests, importable by the ``lightdist`` subprocess (``--model tests.cli_models.X``)."""

from __future__ import annotations

import torch

from lightdist.recipes.digits import DigitsClassifier


class FailsOnFirstStep(DigitsClassifier):
    """The digits CNN whose first training step raises: a run that fails before making progress."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        raise RuntimeError("this model fails on its first step")
