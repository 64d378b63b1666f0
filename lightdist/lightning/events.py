"""Progress of a running Trainer call, streamed from rank 0 to the driver.

Rank side, :class:`EventStreamer` (a callback added to rank 0's copy of the Trainer) sends one plain
dict per event through ``add_streaming_result``. Driver side, the launcher hands each event to the
one progress bar the driver draws (:class:`DriverProgressBar`, defined in Lightning-free
``lightdist._progress`` so that ``lightdist fit --server`` draws the same bar; the ranks' own bars are
removed) and to an :class:`EventHub`: ``PoolStrategy(on_event=...)`` callbacks and ``async for``
consumers of ``PoolStrategy.events()``, e.g. a service forwarding a fine-tuning job's loss as
server-sent events.

Events (every one has ``"event"``; ``step`` is ``trainer.global_step``):

====================  ==========================================================================
``start``             ``fn`` (fit/validate/test/predict), ``max_epochs``, ``max_steps``
``epoch_start``       ``epoch``, ``num_training_batches`` (None when unknown)
``train_batch``       ``step``, ``epoch``, ``batch``, ``metrics`` (progress-bar and logged, floats)
``validation``        ``step``, ``epoch``, ``metrics`` (after each validation run, not sanity check)
``epoch_end``         ``epoch``, ``step``, ``metrics``
``checkpoint``        ``checkpoint_path`` (absolute), ``step``, ``epoch``: a checkpoint file was written
``end``               sent by the driver when the call is over: ``fn``, ``interrupted``, ``error``
====================  ==========================================================================
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightdist._progress import DriverProgressBar  # re-exported: it moved to a Lightning-free module
from lightdist.worker import DistributedWorker

__all__ = ["DriverProgressBar", "EventHub", "EventStreamer"]

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


class EventStreamer(Callback):
    """Rank 0's reporter: one event per hook, sent to the driver at once and in order."""

    def __init__(self, worker: DistributedWorker) -> None:
        self.worker = worker
        self._saving = False  # a checkpoint was being written: report it at the next hook
        self._written: dict[str, int] = {}  # checkpoint path -> mtime_ns last reported

    def _send(self, **event: Any) -> None:
        self.worker.add_streaming_result(event)

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
                    self._send(
                        event="checkpoint",
                        checkpoint_path=os.path.abspath(path),
                        step=trainer.global_step,
                        epoch=trainer.current_epoch,
                    )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._send(event="start", fn="fit", max_epochs=trainer.max_epochs, max_steps=trainer.max_steps)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._send(
            event="epoch_start", epoch=trainer.current_epoch, num_training_batches=_count(trainer.num_training_batches)
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._report_checkpoints(trainer)
        metrics = _floats({**trainer.logged_metrics, **trainer.progress_bar_metrics})
        self._send(
            event="train_batch", step=trainer.global_step, epoch=trainer.current_epoch, batch=batch_idx, metrics=metrics
        )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._report_checkpoints(trainer)
        if not trainer.sanity_checking:
            self._send(
                event="validation",
                step=trainer.global_step,
                epoch=trainer.current_epoch,
                metrics=_floats(trainer.callback_metrics),
            )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._report_checkpoints(trainer)
        self._send(
            event="epoch_end",
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            metrics=_floats(trainer.callback_metrics),
        )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._report_checkpoints(trainer)


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
