"""The Trainer's own progress bar, run in the driver on rank 0's events.

In-process, Lightning calls the progress bar callback's hooks (``on_train_epoch_start``,
``on_validation_batch_end``, ...) with the Trainer. On a pool the hooks run on the ranks, whose
bars are removed; rank 0 sends an event per hook instead (:mod:`lightdist.lightning.events`), and
:class:`BarMirror` calls the same hooks of the driver's own callback object, the one in
``trainer.callbacks``, with a :class:`TrainerView`: rank 0's Trainer as the bar reads it (epoch,
step, batch counts, stage, progress-bar metrics), everything else from the driver's Trainer.

So the bar is Lightning's by construction: ``TQDMProgressBar`` or ``RichProgressBar`` or a
subclass, with its settings (refresh rate, ``leave``, ``process_position``, theme, console
arguments, overridden ``get_metrics``/``init_*_tqdm``/``configure_columns``), drawn by the driver
process (a notebook gets tqdm's widgets or rich's output cells, as in-process).

What a hook cannot get here: the batch and the step's outputs (``batch`` and ``outputs`` are
None), and the model as the ranks have it mid-call (``pl_module`` is the driver's model).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerState, TrainerStatus

__all__ = ["BarMirror", "TrainerView"]

# Event -> the hooks it stands for, in Lightning's order. Batch events are handled on their own.
_HOOKS: dict[str, tuple[str, ...]] = {
    "start": ("on_fit_start",),
    "sanity_check_start": ("on_sanity_check_start",),
    "sanity_check_end": ("on_sanity_check_end",),
    "train_start": ("on_train_start",),
    "epoch_start": ("on_train_epoch_start",),
    "epoch_end": ("on_train_epoch_end",),
    "train_end": ("on_train_end",),
    "validation_start": ("on_validation_start", "on_validation_epoch_start"),
    "validation_end": ("on_validation_epoch_end", "on_validation_end"),
    "test_start": ("on_test_start", "on_test_epoch_start"),
    "test_end": ("on_test_epoch_end", "on_test_end"),
    "predict_start": ("on_predict_start", "on_predict_epoch_start"),
    "predict_end": ("on_predict_epoch_end", "on_predict_end"),
}
_EVALUATION = ("validation", "test", "predict")


class TrainerView:
    """A Trainer as a progress bar reads it: rank 0's values of the fields the bar needs, updated
    from each event's ``trainer`` (see ``lightdist.lightning.events``); any other attribute is
    the driver's Trainer's."""

    def __init__(self, trainer: Any, callback: Any, module: Any) -> None:
        self._driver = trainer
        self.progress_bar_callback = callback
        self.lightning_module = module
        self.is_global_zero = True  # the bar is drawn once, as rank 0 draws it in-process
        self.state = TrainerState(fn=trainer.state.fn, status=TrainerStatus.RUNNING, stage=trainer.state.stage)
        self.current_epoch: int = trainer.current_epoch
        self.global_step: int = trainer.global_step
        self.progress_bar_metrics: dict[str, Any] = dict(trainer.progress_bar_metrics)
        self.num_training_batches: float = float("inf")
        self.num_sanity_val_batches: list[float] = []
        self.num_val_batches: list[float] = []
        self.num_test_batches: list[float] = []
        self.num_predict_batches: list[float] = []

    def update(self, fields: dict[str, Any]) -> None:
        """Apply the fields that changed on rank 0 (unknown names are ignored: a newer rank may
        send more)."""
        for name, value in fields.items():
            if name == "fn":
                self.state.fn = TrainerFn(value) if value is not None else None
            elif name == "stage":
                self.state.stage = RunningStage(value) if value is not None else None
            elif name == "num_training_batches":
                self.num_training_batches = _batches(value)
            elif name in ("num_sanity_val_batches", "num_val_batches", "num_test_batches", "num_predict_batches"):
                setattr(self, name, [_batches(count) for count in value])
            elif name in ("current_epoch", "global_step", "progress_bar_metrics"):
                setattr(self, name, value)

    # The stage flags a bar reads (trainer.sanity_checking, trainer.training, ...), from state.stage.
    sanity_checking = property(lambda self: self.state.stage == RunningStage.SANITY_CHECKING)
    training = property(lambda self: self.state.stage == RunningStage.TRAINING)
    validating = property(lambda self: self.state.stage == RunningStage.VALIDATING)
    testing = property(lambda self: self.state.stage == RunningStage.TESTING)
    predicting = property(lambda self: self.state.stage == RunningStage.PREDICTING)

    def __getattr__(self, name: str) -> Any:
        if name == "_driver":  # not set yet (unpickling): no driver Trainer to ask
            raise AttributeError(name)
        return getattr(self._driver, name)


def _batches(count: int | None) -> float:
    return float("inf") if count is None else count


class BarMirror:
    """Runs ``callback`` (the Trainer's progress bar) on rank 0's events, in the driver.

    Call :meth:`start` before the call, the mirror on each event, :meth:`finish` after it. A hook
    that raises is reported once as a warning and the bar stops drawing for the rest of the call:
    the call itself goes on, as the ranks are not affected.

    Example::

        mirror = BarMirror(trainer, trainer.progress_bar_callback, model)
        mirror.start()
        mirror({"event": "epoch_start", "epoch": 0, "trainer": {"num_training_batches": 4}})
        mirror.finish(None)
    """

    def __init__(self, trainer: Any, callback: Any, module: Any) -> None:
        self.callback = callback
        self.module = module
        self.view = TrainerView(trainer, callback, module)
        self.stage = trainer.state.fn.value if trainer.state.fn is not None else "fit"
        self.broken = False
        self._batch_started: tuple[str, int, int] | None = None  # (stage, dataloader, batch) begun

    def start(self) -> None:
        self._hook("setup", stage=self.stage)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = str(event.get("event"))
        self.view.update(event.get("trainer") or {})
        if kind == "train_batch":
            batch = int(event["batch"])
            self._hook("on_train_batch_start", None, batch)
            self._hook("on_train_batch_end", None, None, batch)
            return
        stage, _, rest = kind.partition("_")
        if stage in _EVALUATION and rest in ("batch_start", "batch"):
            self._evaluation_batch(stage, rest == "batch", int(event["batch"]), int(event.get("dataloader_idx") or 0))
            return
        for hook in _HOOKS.get(kind, ()):
            self._hook(hook)

    def _evaluation_batch(self, stage: str, ended: bool, batch: int, loader: int) -> None:
        counts = {
            "validation": self.view.num_sanity_val_batches if self.view.sanity_checking else self.view.num_val_batches,
            "test": self.view.num_test_batches,
            "predict": self.view.num_predict_batches,
        }[stage]
        # Lightning passes dataloader_idx to the batch hooks only when there are several loaders.
        extra = (loader,) if len(counts) > 1 else ()
        if self._batch_started != (stage, loader, batch):
            self._hook(f"on_{stage}_batch_start", None, batch, *extra)
            self._batch_started = (stage, loader, batch)
        if ended:
            self._hook(f"on_{stage}_batch_end", None, None, batch, *extra)
            self._batch_started = None

    def finish(self, error: BaseException | None, interrupted: bool = False) -> None:
        """End the bar as Lightning ends it after a call (``on_exception`` first when the call
        failed or was interrupted, then ``teardown``), then close any tqdm bar still open: the
        line is finished before anything else is printed."""
        if error is not None or interrupted:
            self._hook("on_exception", error if error is not None else KeyboardInterrupt())
        self._hook("teardown", stage=self.stage)
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None:
            for value in list(vars(self.callback).values()):
                if isinstance(value, tqdm.tqdm):
                    value.close()  # a no-op for a closed bar

    def _hook(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.broken:
            return
        try:
            getattr(self.callback, name)(self.view, self.module, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a drawing failure must not fail the call on the ranks
            self.broken = True
            warnings.warn(
                f"the progress bar {type(self.callback).__name__}.{name} raised {type(exc).__name__}: {exc}; "
                "it is not drawn for the rest of this call",
                stacklevel=2,
            )
