"""Progress bars without Lightning, and the line discipline between a bar and other output.

A Trainer call on a pool draws the Trainer's own progress bar callback in the driver
(``lightdist.lightning._bar``). Two things here serve places that must stay light:

* :func:`write_around_bars`: write text to the terminal while a bar may be drawn on it, as
  ``tqdm.write`` does: the bar is cleared, the text written, the bar redrawn below it, so nothing
  is glued to a bar's line. The driver copies the ranks' output with it. A rich bar needs nothing:
  while it runs it redirects ``sys.stdout``/``sys.stderr`` through its console.
* :class:`EventProgressBar`: the bar of ``lightdist fit --server`` (the thin client imports
  neither torch nor Lightning), drawn from the same events (``lightdist.lightning.events``) with
  the look of Lightning's default bars: one training bar redrawn in place across epochs
  (``Epoch N`` for tqdm, ``Epoch N/M`` for rich, with rate, time left and metrics), a validation
  bar while validation runs, a sanity-check bar that disappears. Bar settings of the config
  (``refresh_rate``, ``leave``, a theme, a subclass) are not read: that bar is drawn with
  Lightning's defaults.

tqdm and rich are imported when a bar first opens.
"""

from __future__ import annotations

import math
import sys
from typing import Any

__all__ = ["EventProgressBar", "write_around_bars"]


def write_around_bars(stream: Any, text: str) -> None:
    """Write ``text`` (whole lines) to ``stream`` without breaking a tqdm bar drawn on the same
    terminal: the bar is cleared first and redrawn under the text. Safe from any thread."""
    tqdm = sys.modules.get("tqdm")  # no tqdm bar can be open if tqdm was never imported
    try:
        try:
            around = tqdm is not None and _open_tqdm_bars(tqdm)
        except Exception:  # tqdm's bookkeeping changed under us: the text matters more than the bar
            around = False
        if not around or tqdm is None:
            stream.write(text)
            stream.flush()
            return
        with tqdm.tqdm.external_write_mode(file=stream):
            stream.write(text)
            stream.flush()
    except (OSError, ValueError):
        pass  # a closed stream: the text has nowhere to go


def _open_tqdm_bars(tqdm: Any) -> bool:
    # A bar enters tqdm's _instances in __new__, before __init__ sets `disable`: one being built on
    # the main thread while this (output) thread looks has no `disable` yet and is not drawn yet.
    return any(not getattr(bar, "disable", True) for bar in list(getattr(tqdm.tqdm, "_instances", ())))


_TQDM_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
_PURPLE = "#6206E0"  # Lightning's rich bar colour


class EventProgressBar:
    """The progress bar of a Trainer call drawn from its events, with the look of Lightning's
    ``TQDMProgressBar()`` or, with ``rich=True``, ``RichProgressBar()``.

    Example::

        bar = EventProgressBar()
        bar({"event": "train_start", "trainer": {"fn": "fit", "stage": "train"}})
        bar({"event": "epoch_start", "epoch": 0, "trainer": {"num_training_batches": 2}})
        bar({"event": "train_batch", "batch": 0, "trainer": {"progress_bar_metrics": {"loss": 0.5}}})
        bar.close()
    """

    def __init__(self, rich: bool = False) -> None:
        self.rich = rich
        self.fields: dict[str, Any] = {}  # rank 0's Trainer fields, from the events' "trainer"
        self.max_epochs: int | None = None
        self._bars: _RichBars | _TqdmBars | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = str(event.get("event"))
        self.fields.update(event.get("trainer") or {})
        if kind == "start":
            self.max_epochs = event.get("max_epochs")
        if self._bars is None:
            if not kind.endswith("_start"):
                return  # joined mid-stage: wait for the next stage to draw
            self._bars = _RichBars(self) if self.rich else _TqdmBars(self)
        self._bars.handle(kind, event)

    def metrics(self) -> dict[str, Any]:
        """What Lightning's bars show after the bar: the logger's version, then progress-bar metrics."""
        return {**(self.fields.get("standard_metrics") or {}), **(self.fields.get("progress_bar_metrics") or {})}

    def total(self, stage: str, loader: int = 0) -> float:
        """The number of batches of ``stage``'s current dataloader (inf when unknown)."""
        if stage == "train":
            count = self.fields.get("num_training_batches")
        else:
            key = {"validation": "num_val_batches", "test": "num_test_batches", "predict": "num_predict_batches"}[stage]
            if self.sanity_checking:
                key = "num_sanity_val_batches"
            counts = self.fields.get(key) or []
            count = counts[loader] if loader < len(counts) else None
        return float("inf") if count is None else float(count)

    @property
    def sanity_checking(self) -> bool:
        return bool(self.fields.get("stage") == "sanity_check")

    def write(self, line: str) -> None:
        """Print ``line`` to stdout without breaking an open bar (it is printed above the bar)."""
        if isinstance(self._bars, _RichBars):
            self._bars.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            write_around_bars(sys.stdout, line + "\n")

    def close(self) -> None:
        """Finish the bars still open, if any (safe to call twice)."""
        if self._bars is not None:
            self._bars.close()
            self._bars = None


_EVALUATION = {"validation": "Validation", "test": "Testing", "predict": "Predicting"}


def _evaluation(kind: str) -> tuple[str, str] | None:
    """``"validation_batch_start"`` -> ``("validation", "batch_start")``; None for other events."""
    stage, _, what = kind.partition("_")
    return (stage, what) if stage in _EVALUATION and what in ("start", "end", "batch_start", "batch") else None


def _label(stage: str, sanity_checking: bool) -> str:
    return "Sanity Checking" if sanity_checking and stage == "validation" else _EVALUATION[stage]


class _TqdmBars:
    """What ``TQDMProgressBar()`` draws: a training bar reset each epoch, and below it a bar per
    evaluation stage that is cleared when the stage ends (kept after ``validate``)."""

    def __init__(self, owner: EventProgressBar) -> None:
        self.owner = owner
        self.bars: dict[str, Any] = {}  # stage -> tqdm bar

    def _open(self, stage: str, description: str, position: int, leave: bool, **options: Any) -> None:
        self.close_stage(stage)
        self.bars[stage] = _padded_tqdm()(
            desc=description,
            position=position,
            leave=leave,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=_TQDM_FORMAT,
            **options,
        )

    def close_stage(self, stage: str) -> None:
        bar = self.bars.pop(stage, None)
        if bar is not None:
            bar.close()

    def handle(self, kind: str, event: dict[str, Any]) -> None:
        owner = self.owner
        train = self.bars.get("train")
        evaluation = _evaluation(kind)
        if kind == "sanity_check_start":
            self._open("validation", "Sanity Checking", 0, False)
        elif kind == "sanity_check_end":
            self.close_stage("validation")
        elif kind == "train_start":
            self._open("train", "Training", 0, True, smoothing=0)
        elif kind == "train_end":
            self.close_stage("train")
        elif train is not None and kind == "epoch_start":
            train.reset(total=_finite(owner.total("train")))
            train.set_description(f"Epoch {owner.fields.get('current_epoch', 0)}")
        elif train is not None and kind in ("train_batch", "epoch_end"):
            if kind == "train_batch":
                _show(train, int(event.get("batch", 0)) + 1)
            train.set_postfix(owner.metrics())
        elif evaluation is not None:
            self._evaluation(*evaluation, event)

    def _evaluation(self, stage: str, what: str, event: dict[str, Any]) -> None:
        owner = self.owner
        bar = self.bars.get(stage)
        loader = int(event.get("dataloader_idx") or 0)
        if what == "start" and not owner.sanity_checking:  # (the sanity check has its bar open)
            beside = stage == "validation" and owner.fields.get("fn") == "fit"  # under the training bar
            self._open(stage, _EVALUATION[stage], 1 if beside else 0, not beside)
        elif what == "batch_start" and bar is not None:
            bar.reset(total=_finite(owner.total(stage, loader)))
            bar.set_description(f"{_label(stage, owner.sanity_checking)} DataLoader {loader}")
        elif what == "batch" and bar is not None:
            _show(bar, int(event.get("batch", 0)) + 1)
        elif what == "end":
            self.close_stage(stage)
            train = self.bars.get("train")
            if stage == "validation" and owner.fields.get("fn") == "fit" and train is not None:
                train.set_postfix(owner.metrics())

    def close(self) -> None:
        for stage in list(self.bars):
            self.close_stage(stage)


def _padded_tqdm() -> Any:
    """tqdm with numbers padded to a fixed width, as Lightning's bar has them: the line does not
    jitter as a metric goes from 0.5 to 0.25."""
    from tqdm import tqdm

    class Padded(tqdm):  # type: ignore[misc]
        @staticmethod
        def format_num(n: Any) -> str:
            text = str(n if isinstance(n, str) else tqdm.format_num(n))
            if not isinstance(n, (float, str)) or "e" in text:
                return text
            if "." not in text and len(text) < 5:
                try:
                    float(text)
                except ValueError:
                    return text
                text += "."
            return text.ljust(5, "0")

    return Padded


def _show(bar: Any, n: int) -> None:
    bar.n = n
    bar.refresh()


def _finite(total: float) -> int | None:
    return None if math.isinf(total) else int(total)


class _RichBars:
    """What ``RichProgressBar()`` draws: one live display with the training bar (``Epoch N/M``,
    batches, time and time left, speed, metrics) and a bar per evaluation run, hidden when it ends."""

    def __init__(self, owner: EventProgressBar) -> None:
        from rich.progress import Progress

        self.owner = owner
        self.tasks: dict[str, Any] = {}  # stage -> task id
        self.progress = Progress(*_rich_columns(), refresh_per_second=10)
        self.progress.start()

    def handle(self, kind: str, event: dict[str, Any]) -> None:
        owner = self.owner
        fitting = owner.fields.get("fn") == "fit"
        if kind == "epoch_start":
            description = f"Epoch {owner.fields.get('current_epoch', 0)}"
            if owner.max_epochs is not None:
                description += f"/{owner.max_epochs - 1}"
            self._task("train", description.ljust(len("Validation")), owner.total("train"), visible=True)
        elif kind in ("train_batch", "epoch_end") or (kind == "validation_end" and fitting):
            if "train" in self.tasks:
                shown = " ".join(f"{k}: {_metric(v)}" for k, v in owner.metrics().items())
                self.progress.update(self.tasks["train"], metrics=shown)
            if kind == "train_batch":
                self._advance("train", int(event.get("batch", 0)) + 1)
            if kind == "validation_end" and "validation" in self.tasks:
                self.progress.update(self.tasks["validation"], visible=False)
        elif kind == "sanity_check_end" and "validation" in self.tasks:
            self.progress.update(self.tasks.pop("validation"), visible=False)
        elif (evaluation := _evaluation(kind)) is not None and evaluation[1] == "batch_start":
            stage, loader = evaluation[0], int(event.get("dataloader_idx") or 0)
            label = _label(stage, owner.sanity_checking)
            # validation bars show from their first batch's end, as Lightning's
            self._task(stage, label, owner.total(stage, loader), visible=stage != "validation", new=True)
        elif evaluation is not None and evaluation[1] == "batch":
            self._advance(evaluation[0], int(event.get("batch", 0)) + 1)

    def _task(self, stage: str, description: str, total: float, visible: bool, new: bool = False) -> None:
        size = _finite(total)  # None: rich pulses a bar of unknown size
        if stage in self.tasks and not new:
            self.progress.reset(self.tasks[stage], total=size, description=description, visible=visible)
            return
        if stage in self.tasks:
            self.progress.update(self.tasks[stage], visible=False)
        self.tasks[stage] = self.progress.add_task(description, total=size, visible=visible, metrics="")

    def _advance(self, stage: str, completed: int) -> None:
        if stage in self.tasks:
            self.progress.update(self.tasks[stage], completed=completed, visible=True)

    def close(self) -> None:
        self.progress.stop()


def _rich_columns() -> list[Any]:
    """The columns of Lightning's rich bar (its default theme)."""
    from rich.progress import BarColumn, ProgressColumn, Task, TextColumn
    from rich.text import Text

    class Batches(ProgressColumn):
        def render(self, task: Task) -> Text:
            total = "--" if task.total is None else str(int(task.total))
            return Text(f"{int(task.completed)}/{total}")

    class Times(ProgressColumn):
        max_refresh = 0.5  # seconds: the clock does not flicker

        def render(self, task: Task) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            return Text(f"{_clock(elapsed)} • {_clock(task.time_remaining)}", style="dim")

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:.2f}it/s", style="dim underline")

    return [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(complete_style=_PURPLE, finished_style=_PURPLE, pulse_style=_PURPLE),
        Batches(),
        Times(),
        Speed(),
        TextColumn("{task.fields[metrics]}", style="italic"),
    ]


def _metric(value: Any) -> str:
    try:
        return f"{value:.3f}"
    except (TypeError, ValueError):
        return str(value)


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
