"""The one progress bar of a pool run, drawn from rank 0's progress events.

Two places draw it: the driver of a local pool (``lightdist.lightning.launcher``, from the events
rank 0 streams) and the thin client of ``lightdist fit --server`` (from the same events, relayed by
the server). This module imports neither torch nor Lightning so that the thin client stays light:
tqdm and rich are imported when a bar first opens.

An event is Lightning's plain dict (``lightdist.lightning.events``): ``epoch_start`` opens the bar of
an epoch, ``train_batch`` advances it, ``validation`` updates its metrics, ``epoch_end`` closes it.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["DriverProgressBar"]


class DriverProgressBar:
    """The one progress bar of a pool fit, drawn by the driver from rank 0's events: tqdm, or rich
    when the Trainer was given Lightning's ``RichProgressBar`` (as Lightning users expect).

    Example::

        bar = DriverProgressBar()
        bar({"event": "epoch_start", "epoch": 0, "num_training_batches": 2})
        bar({"event": "train_batch", "step": 1, "epoch": 0, "batch": 0, "metrics": {"loss": 0.5}})
        bar.close()
    """

    def __init__(self, rich: bool = False) -> None:
        self.rich = rich
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "epoch_start":
            self.close()
            self._open(f"Epoch {event['epoch']}", event["num_training_batches"])
        elif self.bar is not None and kind in ("train_batch", "validation", "epoch_end"):
            shown = {k: f"{v:.4g}" for k, v in event["metrics"].items() if k != "epoch"}
            self._advance(1 if kind == "train_batch" else 0, shown)
            if kind == "epoch_end":
                self.close()

    def write(self, line: str) -> None:
        """Print ``line`` to stdout without breaking an open bar (it is printed above the bar)."""
        if self.bar is None:
            print(line, flush=True)
        elif self.rich:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stdout)

    def _open(self, description: str, total: int | None) -> None:
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
            )
            self.bar.start()
            self.task = self.bar.add_task(description, total=total, metrics="")
        else:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True, leave=True)

    def _advance(self, steps: int, metrics: dict[str, str]) -> None:
        if self.rich:
            self.bar.update(self.task, advance=steps, metrics=" ".join(f"{k}={v}" for k, v in metrics.items()))
        else:
            if steps:
                self.bar.update(steps)
            self.bar.set_postfix(metrics, refresh=not steps)

    def close(self) -> None:
        """Finish the open bar, if any (safe to call twice)."""
        if self.bar is not None:
            if self.rich:
                self.bar.stop()
            else:
                self.bar.close()
            self.bar = None
