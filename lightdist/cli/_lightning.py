"""``lightdist fit / validate / test / predict``: LightningCLI with the pool as the default strategy.

Everything Lightning users know carries over (``--config``, ``--trainer.max_epochs=3``,
``--model.init_args.lr=...``, ``--print_config``, ``class_path``/``init_args``); lightdist adds:

- ``trainer.strategy`` defaults to ``lightdist`` (the warm pool);
- ``--config digits/pretrain-cpu`` also finds the shipped config of that name;
- bad input (an unknown key, a wrong type, a missing file) is one line on stderr and exit status 2,
  before any worker starts;
- ``fit`` says where its TensorBoard logs and checkpoints go, and prints the final metrics;
- ``predict --predictions_file out.jsonl`` writes every rank's predictions, in dataset order.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightdist.lightning  # noqa: F401  (registers strategy="lightdist" with Lightning)
from lightdist.cli._catalog import resolve_config_args
from lightdist.errors import ConfigError, WorkerDiedError, WorkerError

__all__ = ["LightdistCLI", "run_trainer_command"]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class LightdistCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule/LightningDataModule, on the pool by default.

    Example (what ``lightdist fit --config x.yaml`` does)::

        LightdistCLI(args=["fit", "--config", "x.yaml"])

    With ``run=False`` (as ``lightdist sweep`` uses it) ``args`` holds no subcommand and the caller
    runs ``cli.trainer.fit(cli.model, datamodule=cli.datamodule)`` itself.
    """

    def __init__(self, args: Sequence[str], *, run: bool = True, quiet: bool = False) -> None:
        self.quiet = quiet
        # exit_on_error=False makes jsonargparse raise instead of printing its whole usage text, so
        # the caller can print the one line that matters. Subcommand parsers take their own kwargs.
        parser_kwargs: dict[str, Any] = {"exit_on_error": False}
        parser_kwargs.update({name: {"exit_on_error": False} for name in _SUBCOMMANDS})
        with warnings.catch_warnings():
            # LightningCLI warns when args= is given while sys.argv has arguments too: here args
            # are sys.argv's, with --config names resolved (or a sweep's combination).
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().__init__(
                trainer_defaults={"strategy": "lightdist"},
                parser_kwargs=parser_kwargs,
                args=list(args),
                run=run,
            )

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


def one_line(error: BaseException) -> str:
    """An error message on one line (jsonargparse's span several, indented)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def explain(error: BaseException) -> str:
    """The line to show for a bad command line or config.

    A recipe's own ``ConfigError`` wins wherever it sits in the exception chain (jsonargparse wraps
    errors raised by a class's ``__init__``). For a ``class_path`` group jsonargparse reports every
    member of the ``Union[Module, None]`` it tried; only the class's own complaint is kept, with its
    key made whole: ``model.lr: Expected a <class 'float'>. Got value: abc``.
    """
    config_error = _config_error_in(error)
    if config_error is not None:
        return one_line(config_error)
    text = str(error)
    group = re.match(r'Parser key "([^"]+)":', text)
    problem = re.search(r"Problem with given class_path '([^']+)':\s*(.*?)(?:\n\s*- Expected a <class 'NoneType'>|$)",
                        text, re.S)  # fmt: skip
    if group is None or problem is None:
        return one_line(error)
    class_path, detail = problem.group(1), one_line(Exception(problem.group(2)))
    inner = re.match(r'Parser key "([^"]+)":\s*(.*)', detail)
    if inner is not None:
        return f"{group.group(1)}.{inner.group(1)}: {inner.group(2)}"
    unknown = re.match(r"Option '([^']+)' is not accepted", detail)
    if unknown is not None:
        return f"{group.group(1)}.{unknown.group(1)}: no such argument of {class_path}"
    return f"{group.group(1)} ({class_path}): {detail}"


def _config_error_in(error: BaseException) -> ConfigError | None:
    """The recipe's ``ConfigError`` in ``error``'s chain (jsonargparse wraps what ``__init__`` raises)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _caused_by_config_error(error: BaseException) -> bool:
    return _config_error_in(error) is not None


def run_trainer_command(command: str, args: list[str]) -> int:
    """``lightdist <command> args...`` → exit status (0 ok, 1 a rank failed, 2 bad input)."""
    try:
        cli = LightdistCLI([command, *resolve_config_args(args)])
    except (ArgumentError, ConfigError) as error:
        print(f"lightdist {command}: error: {explain(error)} (see: lightdist {command} --help)", file=sys.stderr)
        return 2
    except ValueError as error:
        if not _caused_by_config_error(error):
            raise
        print(f"lightdist {command}: error: {explain(error)}", file=sys.stderr)
        return 2
    except WorkerError as error:
        if error.exc_type.rsplit(".", 1)[-1] == ConfigError.__name__:  # a recipe's check that needs the ranks
            print(f"lightdist {command}: error: {one_line(Exception(error.message))}", file=sys.stderr)
            return 2
        print(f"lightdist {command}: {error}", file=sys.stderr)
        return 1
    except WorkerDiedError as error:
        print(f"lightdist {command}: {error}", file=sys.stderr)
        return 1
    if cli.trainer.interrupted:  # Ctrl-C: the ranks stopped at the same batch and the driver returned
        print(f"lightdist {command}: interrupted", file=sys.stderr)
        return 130
    return 0
