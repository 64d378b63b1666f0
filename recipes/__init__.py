"""Fine-tuning recipes for the ``lightdist`` CLI.

One module per task, each a ``LightningModule`` and a ``LightningDataModule``, with a docstring that
opens with the command that runs it. The configs that use them are in ``configs/<recipe>/``;
``lightdist recipes`` lists both, read from disk.
"""
