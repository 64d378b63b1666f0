"""A ``lightdist fit/validate/test/predict`` command line, run as a job inside the server.

The same :class:`~lightdist.cli._lightning.LightdistCLI` a local command runs (so a config means the
same on a server as on a laptop), with three differences: what the local command prints becomes
``log`` events, rank 0's progress events become job events, and the Trainer must run on the
server's own pool (a config that asks for another layout or strategy is refused before it is
queued, with the line to fix it).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from typing_extensions import override

from lightdist.cli._catalog import resolve_config_args
from lightdist.cli._errors import BAD_INPUT, INTERRUPTED, RANK_FAILED, classify, explain
from lightdist.cli._lightning import LightdistCLI
from lightdist.errors import ConfigError, WorkerError

__all__ = ["JobOutcome", "Layout", "Prepared", "run_cli_job", "validate_cli_job"]

Emit = Callable[[str, dict[str, Any]], None]


class Layout:
    """The server's pool: what a job's Trainer must ask for."""

    def __init__(self, world_size: int, accelerator: str) -> None:
        self.world_size = world_size
        self.accelerator = accelerator

    def trainer_defaults(self) -> dict[str, Any]:
        """A job's Trainer runs on the whole pool unless its config says otherwise (and then must match)."""
        return {"devices": self.world_size, "accelerator": self.accelerator}

    def check(self, trainer_config: Namespace | dict[str, Any]) -> None:
        """Raise :class:`ConfigError` (one line saying what to change) for a Trainer this pool cannot run."""
        get = trainer_config.get
        strategy = get("strategy")
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", type(strategy).__name__)
        if name not in ("lightdist", "lightdist.PoolStrategy", "lightdist.lightning.strategy.PoolStrategy"):
            raise ConfigError(f"trainer.strategy={name!r}: a server runs jobs on its pool; use strategy lightdist")
        if get("num_nodes", 1) not in (1, None):
            raise ConfigError("trainer.num_nodes: a server's pool is one host; drop num_nodes")
        devices = get("devices")
        if isinstance(devices, str) and devices.strip().isdigit():
            devices = int(devices)
        if devices not in ("auto", None) and devices != self.world_size:
            raise ConfigError(
                f"trainer.devices={devices!r}: this server runs {self.world_size} rank(s); use "
                f"--trainer.devices={self.world_size} or a server started with --devices {devices}"
            )
        accelerator = get("accelerator")
        wanted = {"gpu": "cuda"}.get(str(accelerator), str(accelerator))
        if accelerator not in ("auto", None) and wanted != self.accelerator:
            raise ConfigError(
                f"trainer.accelerator={accelerator!r}: this server's ranks run on {self.accelerator}; use "
                f"--trainer.accelerator={self.accelerator} or a server started with --accelerator {accelerator}"
            )


@dataclass(frozen=True)
class Prepared:
    """A command line parsed at submission, handed to its job so it is not parsed twice (~0.3 s of
    the ~1 s from Enter to the first step). Used by exactly one thread at a time: the validator,
    then the job."""

    parser: Any
    config: Any
    subcommand_parsers: dict[str, Any]
    subcommand_method_arguments: dict[str, list[str]]


class _Parsed(Exception):
    """Raised after parsing to stop LightningCLI before it seeds, instantiates or runs anything."""

    def __init__(self, prepared: Prepared) -> None:
        super().__init__("parsed")
        self.prepared = prepared


class _ParseOnly(LightdistCLI):
    def __init__(self, args: Sequence[str], layout: Layout) -> None:
        self._layout_check = layout
        super().__init__(args, quiet=True, trainer_defaults=layout.trainer_defaults())

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._layout_check.check(self.config[self.config["subcommand"]]["trainer"])
        raise _Parsed(Prepared(parser, self.config, self._subcommand_parsers, self._subcommand_method_arguments))


def validate_cli_job(command: str, args: Sequence[str], layout: Layout) -> Prepared:
    """Parse the command line as the job will (nothing is built or run); raise :class:`ConfigError`
    with the one line to show when it is wrong. Returns the parse, for the job."""
    if any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config=") for a in args):
        raise ConfigError(f"--help and --print_config run on this host: 'lightdist {command} ... --print_config'")
    try:
        _ParseOnly([command, *resolve_config_args(list(args))], layout)
    except _Parsed as parsed:
        return parsed.prepared
    except SystemExit as exc:  # jsonargparse exits on a few requests it handles itself
        raise ConfigError(f"the command line asked the parser to exit ({exc.code})") from None
    except Exception as error:  # noqa: BLE001 - classified as the local CLI does
        outcome = classify(error)
        if outcome is not None and outcome[0] == BAD_INPUT:
            raise ConfigError(outcome[1]) from None
        raise ConfigError(explain(error)) from None
    raise AssertionError("LightningCLI returned without parsing")


class JobOutcome:
    """What a finished job reports: exit code (as the local command), metrics, artifacts, error."""

    def __init__(self) -> None:
        self.exit_code = 0
        self.metrics: dict[str, float] = {}
        self.artifacts: dict[str, str] = {}
        self.error: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        return {0: "succeeded", INTERRUPTED: "cancelled"}.get(self.exit_code, "failed")


class _JobCLI(LightdistCLI):
    def __init__(
        self,
        args: Sequence[str],
        emit: Emit,
        layout: Layout,
        on_trainer: Callable[[Any], None],
        resumed: bool,
        prepared: Prepared | None,
    ) -> None:
        self._emit = emit
        self._layout_check = layout
        self._on_trainer = on_trainer
        self._prepared = prepared
        super().__init__(args, trainer_defaults=layout.trainer_defaults(), overwrite_config=resumed)

    @override
    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        if self._prepared is None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            return
        self.parser = self._prepared.parser  # what LightningCLI.setup_parser would have built again
        self._subcommand_parsers = self._prepared.subcommand_parsers
        self._subcommand_method_arguments = self._prepared.subcommand_method_arguments

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        if self._prepared is None:
            super().parse_arguments(parser, args)
        else:
            self.config = self._prepared.config  # parsed and checked (ckpt_path included) at submission

    def __getstate__(self) -> dict[str, Any]:
        # The ranks get a copy of this object too (Lightning's SaveConfigCallback keeps the parser,
        # whose instantiators point back here): the server's hooks and its job store stay here.
        state = self.__dict__.copy()
        for name in ("_emit", "_on_trainer", "_layout_check", "_prepared"):
            state.pop(name, None)
        return state

    @override
    def after_instantiate_classes(self) -> None:
        strategy = getattr(self.trainer.strategy, "strategy_name", type(self.trainer.strategy).__name__)
        self._layout_check.check({"strategy": strategy, "devices": self.trainer.world_size})
        super().after_instantiate_classes()
        self._on_trainer(self.trainer)

    @override
    def _say(self, text: str) -> None:
        self._emit("log", {"message": text})


def run_cli_job(
    command: str,
    args: Sequence[str],
    layout: Layout,
    emit: Emit,
    on_trainer: Callable[[Any], None],
    resumed: bool = False,
    prepared: Prepared | None = None,
) -> JobOutcome:
    """Run the command like ``lightdist COMMAND ARGS`` would, in this (the server's) process;
    ``resumed``: a later attempt of a job the server was stopped in (it may rewrite its config.yaml)."""
    outcome = JobOutcome()
    cli: _JobCLI | None = None
    try:
        cli = _JobCLI([command, *resolve_config_args(list(args))], emit, layout, on_trainer, resumed, prepared)
    except Exception as error:  # noqa: BLE001 - every failure becomes the job's error
        classified = classify(error)
        outcome.exit_code = classified[0] if classified is not None else RANK_FAILED
        outcome.error = _error_dict(error, classified[1] if classified is not None else None)
        return outcome
    trainer = cli.trainer
    if trainer.interrupted:
        outcome.exit_code = INTERRUPTED
    outcome.metrics = _floats(trainer.callback_metrics)
    outcome.artifacts = _artifacts(cli, command)
    return outcome


def _error_dict(error: BaseException, line: str | None) -> dict[str, Any]:
    if isinstance(error, WorkerError):
        return {
            "type": error.exc_type,
            "message": line or error.message,
            "traceback": error.remote_traceback,
            "rank": error.rank,
        }
    text = "".join(traceback.format_exception(error))
    return {"type": type(error).__qualname__, "message": line or str(error), "traceback": text, "rank": None}


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _artifacts(cli: LightdistCLI, command: str) -> dict[str, str]:
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = cli.trainer
    found: dict[str, str] = {}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            found["log_dir"] = str(Path(logger.log_dir).resolve())
            break
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        for key, attr in (("checkpoint_dir", "dirpath"), ("last_checkpoint", "last_model_path")):
            value = getattr(checkpoint, attr, None)
            if value:
                found[key] = str(Path(value).resolve())
        best = getattr(checkpoint, "best_model_path", "")
        if best:
            found["best_checkpoint"] = str(Path(best).resolve())
    if command == "predict":
        predictions = cli.config["predict"].get("predictions_file")
        if predictions:
            found["predictions_file"] = str(Path(predictions).resolve())
    return found
