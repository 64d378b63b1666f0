"""``lightdist fit / validate / test / predict``: LightningCLI with the pool as the default strategy.

Everything Lightning users know carries over (``--config``, ``--trainer.max_epochs=3``,
``--model.init_args.lr=...``, ``--print_config``, ``class_path``/``init_args``); lightdist adds:

- ``trainer.strategy`` defaults to ``lightdist`` (the warm pool);
- ``--config digits/pretrain-cpu`` also finds the shipped config of that name (a file at that path
  first); configs that still say ``class_path: recipes.<module>...`` (the recipes' name before
  ``lightdist.recipes``) work, with a warning;
- bad input (an unknown key, a wrong type, a missing file, a ``--ckpt_path`` that is missing,
  truncated or corrupted, a model that cannot train on the data) is one line on stderr and exit
  status 2, before any worker starts;
- a run that fails before its first step removes the log folder (``version_N``) it created;
- ``fit`` says where its TensorBoard logs and checkpoints go, and prints the final metrics;
- ``predict --predictions_file out.jsonl`` writes every rank's predictions, in dataset order.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightdist.lightning  # noqa: F401  (registers strategy="lightdist" with Lightning)
from lightdist.cli._catalog import resolve_config_args
from lightdist.cli._checkpoint import check_ckpt_path
from lightdist.cli._errors import BAD_INPUT, INTERRUPTED, classify, explain, one_line
from lightdist.recipes import _old_name as old_recipes_name

__all__ = ["LightdistCLI", "explain", "one_line", "run_trainer_command"]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class LightdistCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule/LightningDataModule, on the pool by default.

    Example (what ``lightdist fit --config x.yaml`` does)::

        LightdistCLI(args=["fit", "--config", "x.yaml"])

    With ``run=False`` (as ``lightdist sweep`` uses it) ``args`` holds no subcommand and the caller
    runs ``cli.trainer.fit(cli.model, datamodule=cli.datamodule)`` itself.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        run: bool = True,
        quiet: bool = False,
        trainer_defaults: dict[str, Any] | None = None,
        overwrite_config: bool = False,
    ) -> None:
        self.quiet = quiet
        old_recipes_name.install()  # class_path: recipes.digits... in configs older than lightdist.recipes
        # Only the subcommand that runs gets a parser: each costs ~0.1 s of signature inspection.
        self._only = args[0] if run and args and args[0] in _SUBCOMMANDS else None
        self.new_log_dirs: list[Path] = []  # log folders this command creates, until it makes progress
        # exit_on_error=False makes jsonargparse raise instead of printing its whole usage text, so
        # the caller can print the one line that matters. Subcommand parsers take their own kwargs.
        parser_kwargs: dict[str, Any] = {"exit_on_error": False}
        parser_kwargs.update({name: {"exit_on_error": False} for name in self.subcommands()})
        with warnings.catch_warnings():
            # LightningCLI warns when args= is given while sys.argv has arguments too: here args
            # are sys.argv's, with --config names resolved (or a sweep's combination).
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            try:
                super().__init__(
                    trainer_defaults={"strategy": "lightdist", **(trainer_defaults or {})},
                    # A resumed run writes its config.yaml where the interrupted one did.
                    save_config_kwargs={"overwrite": overwrite_config},
                    parser_kwargs=parser_kwargs,
                    args=list(args),
                    run=run,
                )
            except BaseException:
                self._remove_new_log_dirs()
                raise

    @override
    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]  # a staticmethod in LightningCLI
        every = LightningCLI.subcommands()
        return every if self._only is None else {self._only: every[self._only]}

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # Overrides a private LightningCLI hook (stable since 1.5; pinned in _compat.OVERRIDDEN_HOOKS)
        # because an argument added in add_arguments_to_parser would appear in every subcommand;
        # this one is predict's alone.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument(
                "--predictions_file",
                type=str | None,
                default=None,
                help="write the predictions of all ranks here, one JSON object per line, in dataset order",
            )
        return parser

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Here: LightningCLI torch.loads --ckpt_path next (for its hyperparameters), and the ranks
        # would load it only after the pool started and the log folder was written.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None:
            check_ckpt_path(str(ckpt_path))

    @override
    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # A recipe's model may say, in the driver, that it cannot train on the data (before the
        # pool starts; the same check in its setup() would run on the ranks, after it).
        check = getattr(self.model, "check_data", None)
        if callable(check) and self.datamodule is not None:
            check(self.datamodule)
        self._track_new_log_dirs()

    def _track_new_log_dirs(self) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        # Reading log_dir fixes the version now, in the driver (the launcher reads it again for the ranks).
        dirs = [Path(lg.log_dir) for lg in self.trainer.loggers if isinstance(lg, (CSVLogger, TensorBoardLogger))]
        self.new_log_dirs = [path for path in dirs if not path.exists()]
        hub = getattr(self.trainer.strategy, "hub", None)  # PoolStrategy's progress events from rank 0
        if self.new_log_dirs and hub is not None:
            hub.listeners.append(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["event"] in _PROGRESS_EVENTS:
            self.new_log_dirs = []  # the run got somewhere: its logs are worth keeping, even if it fails

    def _remove_new_log_dirs(self) -> None:
        """After a failure before the first step: remove the log folders this command created.

        Only with PoolStrategy, whose events tell whether a step ran; with another strategy they stay."""
        trainer = getattr(self, "trainer", None)  # None: it failed before the Trainer was built
        if trainer is None or getattr(trainer.strategy, "hub", None) is None:
            return
        for path in self.new_log_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.new_log_dirs = []

    def before_fit(self) -> None:
        self._say(f"lightdist: fit on {self._layout()}")
        log_dir = _tensorboard_dir(self.trainer)
        if log_dir is not None:
            from lightdist.cli._tensorboard import view_hint

            self._say(view_hint(log_dir))
        checkpoint = self.trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            self._say(f"Checkpoints: {checkpoint.dirpath}")  # type: ignore[attr-defined]

    def after_fit(self) -> None:
        self._print_metrics("fit")
        checkpoint = self.trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") if checkpoint is not None else ""
        if last:
            self._say(f"Final checkpoint: {last}")

    def after_validate(self) -> None:
        self._print_metrics("validate")

    def after_test(self) -> None:
        self._print_metrics("test")

    def predict(self, **kwargs: Any) -> None:
        """``trainer.predict`` on the pool; with ``--predictions_file``, its output as JSON lines."""
        # LightningCLI passes only Trainer.predict's own arguments; ours is read from the config
        predictions_file: str | None = self.config["predict"].get("predictions_file")
        predictions = self.trainer.predict(**kwargs)
        if predictions is None:
            self._say("lightdist: predict returned nothing (trainer.predict return_predictions=False)")
            return
        rows = list(_flatten(predictions))
        if predictions_file is None:
            self._say(f"lightdist: {len(rows)} predictions (write them with --predictions_file PATH)")
            for row in rows[:5]:
                self._say(f"  {json.dumps(_jsonable(row))}")
            return
        path = Path(predictions_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as out:  # written aside, renamed when complete: never half a file
            for row in rows:
                out.write(json.dumps(_jsonable(row)) + "\n")
        tmp.replace(path)
        self._say(f"lightdist: wrote {len(rows)} predictions to {path}")

    def _layout(self) -> str:
        strategy = self.trainer.strategy
        return f"{self.trainer.world_size} rank(s), {type(strategy.accelerator).__name__}, {type(strategy).__name__}"

    def _print_metrics(self, stage: str) -> None:
        metrics = {name: float(value) for name, value in self.trainer.callback_metrics.items()}
        if metrics:
            shown = ", ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))
            self._say(f"lightdist: {stage} metrics: {shown}")

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)


# Events of rank 0 after which a failed run keeps its log folder (see lightdist.lightning.events).
_PROGRESS_EVENTS = frozenset({"train_batch", "validation", "epoch_end"})


def _tensorboard_dir(trainer: pl.Trainer) -> str | None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            # reading log_dir fixes the version now, in the driver; the ranks write to the same one
            return logger.log_dir
    return None


def _flatten(predictions: Any) -> Iterable[Any]:
    """Rows of ``trainer.predict``'s output: batches (lists, or several dataloaders) flattened."""
    if isinstance(predictions, (list, tuple)):
        for item in predictions:
            yield from _flatten(item)
    else:
        yield predictions


def _jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return value


def run_trainer_command(command: str, args: list[str]) -> int:
    """``lightdist <command> args...`` → exit status (0 ok, 1 a rank failed, 2 bad input, 130 Ctrl-C)."""
    try:
        cli = LightdistCLI([command, *resolve_config_args(args)])
    except Exception as error:  # noqa: BLE001 - classified in one place; a bug is re-raised
        outcome = classify(error)
        if outcome is None:
            raise
        status, line = outcome
        if status == BAD_INPUT:
            print(f"lightdist {command}: error: {line} (see: lightdist {command} --help)", file=sys.stderr)
        else:
            print(f"lightdist {command}: {error}", file=sys.stderr)  # all of it: the rank's traceback
        return status
    if cli.trainer.interrupted:  # Ctrl-C: the ranks stopped at the same batch and the driver returned
        print(f"lightdist {command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0
