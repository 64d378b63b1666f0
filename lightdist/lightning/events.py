"""Progress of a running Trainer call, streamed from rank 0 to the driver.

Rank side, :class:`EventStreamer` (a callback added to rank 0's copy of the Trainer) sends one plain
dict per event through ``add_streaming_result``. Driver side, the launcher runs the Trainer's own
progress bar callback on them (:mod:`lightdist.lightning._bar`; the ranks' bars are removed) and
hands them to an :class:`EventHub`: ``PoolStrategy(on_event=...)`` callbacks and ``async for``
consumers of ``PoolStrategy.events()``, e.g. a service forwarding a fine-tuning job's loss as
server-sent events. ``lightdist fit --server`` draws its bar from the same events
(:mod:`lightdist._progress`).

Events (every one has ``"event"``; ``step`` is ``trainer.global_step``):

==========================  ====================================================================
``start``                   ``fn`` (fit), ``max_epochs``, ``max_steps``
``epoch_start``             ``epoch``, ``num_training_batches`` (None when unknown)
``train_batch``             ``step``, ``epoch``, ``batch``, ``metrics`` (progress-bar and logged, floats)
``validation``              ``step``, ``epoch``, ``metrics`` (after each validation run, not sanity check)
``epoch_end``               ``epoch``, ``step``, ``metrics``
``checkpoint``              ``checkpoint_path`` (absolute), ``step``, ``epoch``: a checkpoint file was written
``end``                     sent by the driver when the call is over: ``fn``, ``interrupted``, ``error``
``sanity_check_start/end``  for the progress bar, as the hooks of the same names; also
``train_start/end``         ``validation_start``, ``validation_batch_start`` (a dataloader's first
                            batch: ``batch``, ``dataloader_idx``), ``validation_batch`` (each
                            batch's end), ``validation_end``, and the same for ``test`` and ``predict``
==========================  ====================================================================

Every event but ``checkpoint`` and ``end`` also has ``trainer``: the Trainer fields a progress bar
reads (``current_epoch``, ``global_step``, ``num_*_batches``, ``fn``, ``stage``,
``progress_bar_metrics``, ...) that changed since the previous event of the call.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics

from lightdist.worker import DistributedWorker

__all__ = ["EventHub", "EventStreamer"]

Event = dict[str, Any]


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue  # a non-scalar metric has no place on a progress line
        out[key] = number
    return out


def _count(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) else None


def _stage_hook(stage: str) -> Callable[..., None]:
    def hook(self: EventStreamer, trainer: Any, pl_module: Any) -> None:
        self._stage_start(trainer, stage)

    return hook


def _batch_start_hook(stage: str) -> Callable[..., None]:
    def hook(
        self: EventStreamer, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, stage, batch_idx, dataloader_idx)

    return hook


def _batch_end_hook(stage: str) -> Callable[..., None]:
    def hook(
        self: EventStreamer,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, stage, batch_idx, dataloader_idx)

    return hook


class EventStreamer(Callback):
    """Rank 0's reporter: one event per hook, sent to the driver at once and in order.

    Besides the events a listener reads (``train_batch``, ``validation``, ...), it sends the hooks a
    progress bar needs (stage starts and ends, every evaluation batch), each with ``trainer``: the
    fields a progress bar reads of the Trainer (:func:`_bar_fields`) that changed since the last
    event, so that the driver can run the Trainer's own progress bar (``lightdist.lightning._bar``).
    """

    def __init__(self, worker: DistributedWorker) -> None:
        self.worker = worker
        self._saving = False  # a checkpoint was being written: report it at the next hook
        self._written: dict[str, int] = {}  # checkpoint path -> mtime_ns last reported
        self._sent: dict[str, Any] = {}  # the bar fields as last sent: each event carries the changes
        self._loader: int | None = None  # the dataloader whose evaluation batches run now

    def _send(self, trainer: Any, kind: str, *, bar_metrics: bool = False, **event: Any) -> None:
        fields = _bar_fields(trainer, bar_metrics)
        changed = {key: value for key, value in fields.items() if key not in self._sent or self._sent[key] != value}
        self._sent.update(changed)
        self.worker.add_streaming_result({"event": kind, **event, "trainer": changed})

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._saving = True  # the file is written after this hook; ModelCheckpoint records its path then

    def _report_checkpoints(self, trainer: Any) -> None:
        """One ``checkpoint`` event per checkpoint file (re)written since the last report."""
        if not self._saving:
            return
        self._saving = False
        for callback in trainer.checkpoint_callbacks:
            for path in {getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")}:
                try:
                    written = os.stat(path).st_mtime_ns if path else None
                except OSError:
                    written = None
                if written is not None and self._written.get(path) != written:
                    self._written[path] = written
                    self.worker.add_streaming_result(
                        {
                            "event": "checkpoint",
                            "checkpoint_path": os.path.abspath(path),
                            "step": trainer.global_step,
                            "epoch": trainer.current_epoch,
                        }
                    )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._send(trainer, "start", fn="fit", max_epochs=trainer.max_epochs, max_steps=trainer.max_steps)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._send(trainer, "sanity_check_start")

    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        self._send(trainer, "sanity_check_end")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._send(trainer, "train_start")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        count = _count(trainer.num_training_batches)
        self._send(trainer, "epoch_start", epoch=trainer.current_epoch, num_training_batches=count)

    def _progress(self, trainer: Any, kind: str, metrics: dict[str, Any], **event: Any) -> None:
        """An event with the step, epoch and metrics: sent where Lightning's bars read metrics."""
        self._report_checkpoints(trainer)
        step, epoch = trainer.global_step, trainer.current_epoch
        self._send(trainer, kind, bar_metrics=True, step=step, epoch=epoch, metrics=_floats(metrics), **event)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._progress(
            trainer, "train_batch", {**trainer.logged_metrics, **trainer.progress_bar_metrics}, batch=batch_idx
        )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._progress(trainer, "epoch_end", trainer.callback_metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._send(trainer, "train_end")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._report_checkpoints(trainer)

    # Evaluation: validation (in fit, its sanity check, or validate), test and predict.
    def _stage_start(self, trainer: Any, stage: str) -> None:
        self._loader = None
        self._send(trainer, f"{stage}_start")

    def _batch_start(self, trainer: Any, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        # Sent for a dataloader's first batch only (that is where a bar sizes itself to it); the
        # driver runs the hook for the other batches just before their end.
        if dataloader_idx != self._loader:
            self._loader = dataloader_idx
            self._send(trainer, f"{stage}_batch_start", batch=batch_idx, dataloader_idx=dataloader_idx)

    def _batch_end(self, trainer: Any, stage: str, batch_idx: int, dataloader_idx: int) -> None:
        self._send(trainer, f"{stage}_batch", batch=batch_idx, dataloader_idx=dataloader_idx)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            self._report_checkpoints(trainer)
        else:
            self._progress(trainer, "validation", trainer.callback_metrics)
        self._send(trainer, "validation_end", bar_metrics=True)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._send(trainer, "test_end")

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._send(trainer, "predict_end")

    on_validation_start = _stage_hook("validation")
    on_validation_batch_start = _batch_start_hook("validation")
    on_validation_batch_end = _batch_end_hook("validation")
    on_test_start = _stage_hook("test")
    on_test_batch_start = _batch_start_hook("test")
    on_test_batch_end = _batch_end_hook("test")
    on_predict_start = _stage_hook("predict")
    on_predict_batch_start = _batch_start_hook("predict")
    on_predict_batch_end = _batch_end_hook("predict")


def _bar_fields(trainer: Any, bar_metrics: bool) -> dict[str, Any]:
    """What Lightning's progress bars read of the Trainer, JSON-able (a server stores the events):
    the same names as the Trainer's attributes; batch counts None when unknown (infinite).

    ``progress_bar_metrics`` only at the hooks where Lightning's own bars read them on rank 0
    (ends of training batches and epochs, end of validation): elsewhere reading them can compute
    epoch metrics, a collective the other ranks would not join.
    """
    state = trainer.state
    fields: dict[str, Any] = {
        "fn": state.fn.value if state.fn is not None else None,
        "stage": state.stage.value if state.stage is not None else None,
        "current_epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "num_training_batches": _count(trainer.num_training_batches),
        "num_sanity_val_batches": [_count(n) for n in trainer.num_sanity_val_batches],
        "num_val_batches": [_count(n) for n in trainer.num_val_batches],
        "num_test_batches": [_count(n) for n in trainer.num_test_batches],
        "num_predict_batches": [_count(n) for n in trainer.num_predict_batches],
        # the logger's version (v_num) for a bar drawn without the Trainer (lightdist fit --server)
        "standard_metrics": {k: v for k, v in get_standard_metrics(trainer).items() if isinstance(v, (int, str))},
    }
    if bar_metrics:
        fields["progress_bar_metrics"] = _floats(trainer.progress_bar_metrics)
    return fields


class EventHub:
    """Fans events out to callbacks (any thread) and to ``async for`` consumers (their own loops)."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[Event], None]] = []
        self._consumers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = []
        self._lock = threading.Lock()

    def publish(self, event: Event) -> None:
        for listener in list(self.listeners):
            listener(event)
        with self._lock:
            consumers = list(self._consumers)
        for loop, queue in consumers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:
                pass  # that consumer's loop is closed

    def events(self) -> AsyncIterator[Event]:
        """The events of the next (or running) call, ending with its ``end`` event.

        Registers at once (call it on the consumer's running loop): events published after this
        call are kept for the iterator even if iteration starts later.
        """
        entry = (asyncio.get_running_loop(), asyncio.Queue[Event]())
        with self._lock:
            self._consumers.append(entry)
        return self._drain(entry)

    async def _drain(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]) -> AsyncIterator[Event]:
        try:
            while True:
                event = await entry[1].get()
                yield event
                if event["event"] == "end":
                    return
        finally:
            with self._lock:
                self._consumers.remove(entry)
