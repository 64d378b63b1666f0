"""The output the script controls (issue 15, item 2), with real Trainers on a real 2-rank gloo pool.

- The driver's warning filters and logger levels apply in the ranks, for each call.
- Lightning's own lines (model summary, "`Trainer.fit` stopped") show once and unprefixed; a warning
  every rank raises shows once; the user's prints keep their ``[rank N]`` prefix.
- A fit script in a terminal (a pty) prints what the same script prints with ``strategy="ddp"``,
  minus nothing, plus the pool's start lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightdist.lightning import TrainerWorker
from lightdist.lightning import strategy as strategy_module
from tests.conftest import ROOT, shared_lightning_pool, wait_until
from tests.terminal import Screen, run_in_terminal

OUTPUT_TIMEOUT_S = 30  # rank output is asynchronous: how long to wait for the sentinels
SCRIPT_TIMEOUT_S = 420  # per fit script (ddp re-imports torch and Lightning in every rank)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Talk(Callback):
    """On every rank: a warning, a print, and at teardown a sentinel on stdout and stderr (each
    rank's output is ordered per stream, so the sentinel comes after everything before it)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        warnings.warn(f"{self.tag}: raised on every rank", UserWarning, stacklevel=1)
        print(f"{self.tag}: print of rank {trainer.global_rank}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        print(f"{self.tag}: end", flush=True)
        print(f"{self.tag}: end", file=sys.stderr, flush=True)


def fit(tag: str, **kwargs: Any) -> None:
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    options: dict[str, Any] = {
        "strategy": "lightdist",
        "accelerator": "cpu",
        "devices": 2,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [Talk(tag)],
    }
    options.update(kwargs)
    L.Trainer(**options).fit(Tiny(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8))


def output_of(capsys: pytest.CaptureFixture[str], tag: str) -> tuple[str, str]:
    """The driver's stdout and stderr up to both ranks' sentinels."""
    seen = {"out": "", "err": ""}

    def arrived() -> bool:
        cap = capsys.readouterr()
        seen["out"] += cap.out
        seen["err"] += cap.err
        return all(
            f"[rank {r}] {tag}: end\n" in seen["out"] and f"[rank {r}] {tag}: end\n" in seen["err"] for r in (0, 1)
        )

    assert wait_until(arrived, OUTPUT_TIMEOUT_S), seen
    return seen["out"], seen["err"]


@pytest.fixture(scope="module", autouse=True)
def shared_pool() -> Iterator[None]:
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        yield


def test_the_driver_warning_filters_apply_in_the_ranks_for_each_call(capsys: pytest.CaptureFixture[str]) -> None:
    tag = f"t{uuid.uuid4().hex[:8]}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"{tag}: raised")
        fit(tag)
    out, err = output_of(capsys, tag)
    assert "raised on every rank" not in err, err
    # The next call, without the filter: it did not stay in the ranks.
    fit(tag)
    out, err = output_of(capsys, tag)
    shown = [line for line in err.splitlines() if f"{tag}: raised on every rank" in line]
    assert len(shown) == 1, f"one copy for the two ranks, as one process shows it: {err}"
    assert not shown[0].startswith("[rank"), shown
    for rank in (0, 1):  # the user's prints: every rank, prefixed
        assert f"[rank {rank}] {tag}: print of rank {rank}\n" in out


def test_the_driver_logger_levels_apply_in_the_ranks_and_lightning_lines_are_unprefixed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stopped = "`Trainer.fit` stopped: `max_epochs=1` reached."
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    tag = f"t{uuid.uuid4().hex[:8]}"
    lightning_logger.setLevel(logging.ERROR)
    try:
        fit(tag)
    finally:
        lightning_logger.setLevel(level)
    out, err = output_of(capsys, tag)
    assert stopped not in err, "the driver's ERROR level silences the ranks' INFO lines"
    # Restored in the driver: the ranks' INFO lines are back, once and unprefixed, like the summary.
    fit(tag, enable_model_summary=True)
    out, err = output_of(capsys, tag)
    # (In-process, Lightning's lines show as "INFO: ..." when the root logger had handlers when
    # Lightning was imported, as under pytest: the ranks show them as the driver does.)
    assert [line for line in err.splitlines() if line.endswith(stopped)] in ([stopped], [f"INFO: {stopped}"]), (
        out,
        err,
    )
    assert [line.rstrip() for line in out.splitlines() if "Trainable params" in line] == ["Trainable params: 5"], out


# --- the same script with strategy="ddp" and strategy="lightdist", in a terminal ----------------------

SCRIPT = """\
import logging, sys, warnings
import torch
import lightning as L
import lightdist  # after lightning: registers strategy="lightdist"
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", message="the script filters this")
logging.getLogger("lightning.fabric.utilities.distributed").setLevel(logging.ERROR)  # every rank's INFO
logging.getLogger("myproject").setLevel(logging.ERROR)


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("val_loss", loss)  # Lightning warns (rank 0): "sync_dist"

    def configure_callbacks(self):
        rank_zero_info("configure_callbacks: rank zero only")  # before the strategy sets the rank
        return []

    def on_train_start(self):
        warnings.warn("the script filters this")
        warnings.warn("raised on every rank")
        logging.getLogger("myproject").warning("myproject: below the script's level")

    def on_train_end(self):
        print(f"rank {self.global_rank} says bye")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
trainer = L.Trainer(strategy=sys.argv[1], accelerator="cpu", devices=2, max_epochs=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False)
trainer.fit(Model(), data, data)
"""

RANK_PREFIX = re.compile(r"^\[rank \d+\] ")
COLUMNS = 200  # wide enough that no line of the script's output wraps


def run_script(script: Path, strategy: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env["PYTHONPATH"] = str(ROOT)
    return run_in_terminal(
        [sys.executable, script, strategy], cwd=script.parent, env=env, columns=COLUMNS, timeout=SCRIPT_TIMEOUT_S
    )


@pytest.mark.timeout(2 * SCRIPT_TIMEOUT_S + 60)
def test_a_fit_script_in_a_terminal_prints_what_ddp_prints(tmp_path: Path) -> None:
    script = tmp_path / "fit_script.py"
    script.write_text(SCRIPT)
    # Both at once: the two runs share nothing but the CPUs, and each waits seconds for imports.
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(("ddp", "lightdist"), pool.map(lambda s: run_script(script, s), ("ddp", "lightdist"))))
    drawn = {strategy: output for strategy, (_, output) in runs.items()}
    for strategy, (status, output) in runs.items():
        assert status == 0, f"{strategy} failed:\n{output}"
    ddp, ours = (Screen.of(drawn[s], columns=COLUMNS) for s in ("ddp", "lightdist"))
    ddp, ours = [line for line in ddp if line], [line for line in ours if line]
    # The user's prints: every rank, with its prefix.
    assert "[rank 0] rank 0 says bye" in ours and "[rank 1] rank 1 says bye" in ours
    unprefixed = {RANK_PREFIX.sub("", line) for line in ours}

    # Minus nothing: every line of the ddp run is there. ddp's two processes write onto one terminal
    # at the same moments, so a line of one may be glued to a line of the other: such a line counts
    # as present when it is made of lines of the lightdist run.
    missing = [line for line in ddp if not glued(line, unprefixed)]
    assert not missing, f"missing from the lightdist run: {missing}\n{drawn['lightdist']}"
    # Plus only the pool's start (and lines that ddp glued to another one).
    extra = {line for line in unprefixed - set(ddp) if not any(line in glued_line for glued_line in ddp)}
    ready = [line for line in extra if line.startswith("lightdist: 2 ranks ready in ")]
    assert len(ready) == 1 and re.fullmatch(r"lightdist: 2 ranks ready in \d+\.\d s", ready[0]), extra
    assert extra == {"lightdist: starting 2 ranks (cpu, gloo)...", ready[0]}, extra

    # Lightning's own lines: once, unprefixed (the summary in colour, as rich draws it in a terminal).
    for line in (
        "Trainable params: 5",
        "`Trainer.fit` stopped: `max_epochs=2` reached.",
        "configure_callbacks: rank zero only",
    ):
        assert ours.count(line) == 1, (line, drawn["lightdist"])
    summary_head = [raw for raw in drawn["lightdist"].split("\n") if "Name" in raw and "Params" in raw]
    assert summary_head and "\x1b[" in summary_head[0], "rich colours the summary, as for ddp in a terminal"
    # A warning every rank raises: one copy (ddp prints one per process).
    assert sum("UserWarning: raised on every rank" in line for line in ours) == 1, drawn["lightdist"]
    assert drawn["ddp"].count("UserWarning: raised on every rank") == 2
    # The script's warning filter and logger levels held in the ranks.
    assert not any("the script filters this" in line or "myproject" in line for line in ours + ddp)
    assert not any(line.startswith("Initializing distributed") for line in ours + ddp)
    assert not any(RANK_PREFIX.match(line) for line in ours if "says bye" not in line), drawn["lightdist"]


def glued(line: str, pieces: set[str]) -> bool:
    """Whether ``line`` is one of ``pieces`` or several of them written one after the other."""
    if line in pieces:
        return True
    return any(line.startswith(p) and glued(line[len(p) :], pieces) for p in pieces if p and len(p) < len(line))
