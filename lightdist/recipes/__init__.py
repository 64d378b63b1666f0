"""Fine-tuning recipes for the ``lightdist`` CLI.

One module per task, each a ``LightningModule`` and a ``LightningDataModule``, with a docstring that
opens with the command that runs it. The configs that use them are in ``configs/<recipe>/`` inside
this package (installed with it); ``lightdist recipes`` lists both, read from disk, ``lightdist fit
--config <recipe>/<setting>`` runs one and ``lightdist cp <recipe>/<setting> my.yaml`` copies one
out to edit. Nothing here is imported until a config names it.
"""
