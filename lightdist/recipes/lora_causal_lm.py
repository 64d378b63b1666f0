"""lightdist fit --config lora_causal_lm/cpu

LoRA fine-tuning (peft) of a causal language model from a local Hugging Face directory.

Model: ``LoRACausalLM`` loads ``AutoModelForCausalLM`` and its tokenizer from ``model.model_dir``
(a local directory; nothing is downloaded), freezes it and adds LoRA adapters of rank ``model.r``
to ``model.target_modules`` (unset: peft's default for the architecture, e.g. ``q_proj``/``v_proj``
for Llama; ``all-linear`` adapts every linear layer). Only the adapters train. To try it without a
model of your own, make a tiny random Llama first::

    python -m lightdist.recipes.tiny_models causal-lm runs/tiny-causal-lm

Data: ``TextFileDataModule`` reads ``data.train_file`` (optional ``data.val_file``) as ``.txt`` with
one example per non-empty line, or ``.jsonl`` with one ``{"text": ...}`` object per line (for
examples that span lines). Without ``val_file``, ``data.val_fraction`` of the training examples is
held out. Unset ``train_file`` means the built-in corpus of :mod:`lightdist.recipes._text_data`: about 1,900
paragraphs of Python standard-library docstrings. Each example is truncated to
``model.max_length`` tokens and ends with the tokenizer's EOS token; the loss covers every token.

Outputs: TensorBoard curves ``train_loss``, ``val_loss`` (mean loss per token over all ranks) and
``val_ppl`` (its exponential) under ``runs/lora_causal_lm``; checkpoints there
(``checkpoints/last.ckpt``) that hold the adapter weights only, not the frozen base (``--ckpt_path``
loads them back onto the base model from ``model_dir``); with ``model.adapter_dir`` set, rank 0
saves the adapter at the end of ``fit`` (``adapter_model.safetensors``, ``adapter_config.json``),
which ``peft.PeftModel.from_pretrained(base_model, adapter_dir)`` loads.

Override any setting: ``--model.init_args.model_dir=/models/my-llama --model.init_args.r=16``.
Predict: ``lightdist predict --config lora_causal_lm/cpu --ckpt_path
runs/lora_causal_lm/checkpoints/last.ckpt --data.init_args.predict_file=prompts.txt`` (one prompt per
line, or ``.jsonl`` of ``{"prompt": ...}``; unset: the first 32 characters of each validation
example). Each prediction is ``{"index", "prompt", "completion"}``: ``model.max_new_tokens`` tokens
of greedy decoding. With ``--ckpt_path``, LightningCLI takes the ``model`` settings (``model_dir``,
``r``, ``max_new_tokens``...) from the checkpoint's hyperparameters, not from the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightdist import ConfigError
from lightdist.recipes._text_data import Records, check_model_dir, collate, corpus, read_records, split_examples

__all__ = ["LoRACausalLM", "TextFileDataModule"]

_MODEL_HINT = (
    "give a local Hugging Face causal LM directory (config.json, weights, tokenizer files), e.g. "
    "make a tiny one with: python -m lightdist.recipes.tiny_models causal-lm runs/tiny-causal-lm"
)
_PROMPT_CHARS = 32  # without predict_file, each validation example's first 32 characters are the prompt


class LoRACausalLM(pl.LightningModule):
    """A frozen Hugging Face causal LM with trainable LoRA adapters, trained on next-token loss.

    Args:
        model_dir: local Hugging Face causal LM directory (weights and tokenizer).
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the LoRA input.
        target_modules: module names to adapt; ``None`` = peft's default for the architecture,
            ``"all-linear"`` = every linear layer but the output head.
        lr: AdamW learning rate (constant).
        max_length: examples and prompts are truncated to this many tokens.
        adapter_dir: where rank 0 saves the adapter at the end of ``fit``.
        max_new_tokens: tokens generated per prompt by ``predict``.
    """

    def __init__(
        self,
        model_dir: str,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.05,
        target_modules: list[str] | str | None = None,
        lr: float = 2e-4,
        max_length: int = 128,
        adapter_dir: str | None = None,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
            raise ConfigError(
                f"model: need r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={r}, alpha={alpha}, dropout={dropout})"
            )
        if lr <= 0 or max_length < 2 or max_new_tokens < 1:
            raise ConfigError(
                f"model: need lr > 0, max_length >= 2 and max_new_tokens >= 1 (got lr={lr}, "
                f"max_length={max_length}, max_new_tokens={max_new_tokens})"
            )
        directory = check_model_dir(model_dir, "model.model_dir", _MODEL_HINT)
        self.lr, self.max_length, self.max_new_tokens, self.adapter_dir = lr, max_length, max_new_tokens, adapter_dir
        self.tokenizer, self.model = _load(directory, r, alpha, dropout, target_modules)
        # Batched generation needs the prompts flush right, next to the first generated token.
        self.tokenizer.padding_side = "left"
        # The checkpoint holds the adapter only (on_save_checkpoint): loading it must not demand the
        # frozen base weights, which come from model_dir.
        self.strict_loading = False

    def _trainable(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def _lm_batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels``; each text ends with EOS."""
        eos = self.tokenizer.eos_token_id
        room = self.max_length - (1 if eos is not None else 0)
        ids = [
            seq[:room] + ([eos] if eos is not None else [])
            for seq in self.tokenizer(texts, truncation=True, max_length=room)["input_ids"]
        ]
        width = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        # Padding is masked out of the loss by position, not by id: the pad id may be EOS itself.
        labels = input_ids.masked_fill(mask == 0, -100)
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "labels": labels.to(self.device),
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**self._lm_batch(batch["text"])).loss
        self.log("train_loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_tokens = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        encoded = self._lm_batch(batch["text"])
        loss = self.model(**encoded).loss
        # transformers averages over the predicted (shifted) tokens: weigh batches by that count so
        # val_loss is the exact mean per token over the whole split.
        tokens = (encoded["labels"][:, 1:] != -100).sum()
        self._val_sum += loss.double() * tokens
        self._val_tokens += tokens

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        val_loss = (total / tokens.clamp(min=1)).float()
        # Already summed over ranks, so every rank logs the same value; sync_dist keeps that true
        # for Lightning's bookkeeping (and costs one tiny all-reduce).
        self.log("val_loss", val_loss, sync_dist=True, prog_bar=True)
        self.log("val_ppl", torch.exp(val_loss.clamp(max=50)), sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        prompts: list[str] = batch["prompt"]
        encoded = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        generated = self.model.generate(
            **encoded, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        completions = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [
            {"index": i, "prompt": p, "completion": c} for i, p, c in zip(batch["index"].tolist(), prompts, completions)
        ]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep the adapter only: the frozen base can be reloaded from model_dir, and copying a 7B
        # base into every checkpoint would cost its full size on disk each time.
        trainable = self._trainable()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # strict_loading is off for the frozen base, so check the adapter part by hand: a checkpoint
        # of another r or target_modules must not load silently as an untrained adapter.
        missing = sorted(self._trainable() - set(checkpoint["state_dict"]))
        if missing:
            raise ConfigError(
                f"ckpt_path: the checkpoint lacks {len(missing)} adapter tensor(s) of this model "
                f"(first: {missing[0]}); was it saved with other model.r/target_modules?"
            )

    def on_train_end(self) -> None:
        if self.adapter_dir and self.trainer.is_global_zero:
            self.model.save_pretrained(self.adapter_dir, safe_serialization=True)


def _load(
    directory: str, r: int, alpha: int, dropout: float, target_modules: list[str] | str | None
) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        base = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.model_dir: cannot load a causal LM and tokenizer from {directory!r}: {first} ({_MODEL_HINT})"
        ) from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"model.model_dir: the tokenizer in {directory!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice for decoder-only models
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise ConfigError(
            f"model.target_modules: {exc} (name the modules to adapt, e.g. "
            "--model.init_args.target_modules='[q_proj,v_proj]', or all-linear)"
        ) from exc
    # from_pretrained returns eval mode and Lightning keeps module modes: LoRA dropout needs train.
    model.train()
    return tokenizer, model


class TextFileDataModule(pl.LightningDataModule):
    """Plain text for causal-LM training from ``.txt``/``.jsonl`` files, or the built-in corpus.

    Batches are ``{"index": LongTensor, "text": list[str]}`` (``"prompt"`` for predict); the model
    tokenizes.

    Args:
        train_file: ``.txt`` (one example per non-empty line) or ``.jsonl`` (``{"text": ...}``);
            ``None`` = the built-in docstring corpus.
        val_file: same format; ``None`` = hold out ``val_fraction`` of the training examples.
        predict_file: prompts, ``.txt`` (one per non-empty line) or ``.jsonl`` (``{"prompt": ...}``);
            ``None`` = the first 32 characters of each validation example.
        batch_size: examples per batch on each rank.
        val_fraction: share of the (shuffled) training examples held out when there is no ``val_file``.
        seed: shuffles the examples before ``max_examples`` and the hold-out split.
        max_examples: use at most this many examples of each file (after shuffling), for quick runs.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        predict_file: str | None = None,
        batch_size: int = 8,
        val_fraction: float = 0.1,
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
        rows = [{"text": t} for t in corpus()] if train_file is None else _read(train_file, "data.train_file", "text")
        train, val = split_examples(rows, val_fraction, seed, max_examples, hold_out=val_file is None)
        if val_file is not None:
            val, _ = split_examples(
                _read(val_file, "data.val_file", "text"), val_fraction, seed, max_examples, hold_out=False
            )
        if not train:
            raise ConfigError("data.max_examples: leaves no training examples after the validation hold-out")
        if predict_file is not None:  # in file order, uncapped: every prompt gets a completion
            self.predict_rows = _read(predict_file, "data.predict_file", "prompt")
        else:
            self.predict_rows = [{"prompt": row["text"][:_PROMPT_CHARS]} for row in val]
        self.train_rows, self.val_rows = train, val

    def _loader(self, rows: list[dict[str, str]], shuffle: bool = False) -> DataLoader[dict[str, Any]]:
        return DataLoader(Records(rows), batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader(self.val_rows)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        return self._loader(self.predict_rows)


def _read(path: str, setting: str, key: str) -> list[dict[str, str]]:
    """``.txt``: one ``{key: line}`` per non-empty line; ``.jsonl``: objects with a ``key`` string."""
    hint = f'give a .txt with one example per line or a .jsonl of {{"{key}": ...}} objects'
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{setting}: no such file: {path!r} ({hint})")
    if file.suffix.lower() == ".jsonl":
        return read_records(path, setting, (key,), hint)
    if file.suffix.lower() != ".txt":
        raise ConfigError(f"{setting}: {path!r} is neither .txt nor .jsonl ({hint})")
    rows = [{key: line.strip()} for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{setting}: {path!r} has no non-empty lines; {hint}")
    return rows
