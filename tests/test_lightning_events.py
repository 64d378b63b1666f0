"""Progress of a pool fit streamed to the driver while it runs: listeners, one driver-side progress
bar, and an SSE endpoint forwarding the events of a running fit (issue: PoolStrategy, item 7)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from lightdist import PoolStrategy, protocol
from lightdist.lightning import TrainerWorker
from lightdist.lightning import strategy as strategy_module
from tests.conftest import shared_lightning_pool, wait_until
from tests.test_lightning import Regressor, loader
from tests.test_sse import serve

STEP_S = 0.15


class Slow(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(STEP_S)
        return super().training_step(batch, batch_idx)


@pytest.fixture(scope="module", autouse=True)
def shared_pool() -> Iterator[None]:
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        yield


def fit_trainer(strategy: PoolStrategy, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "strategy": strategy,
        "accelerator": "cpu",
        "devices": 2,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def test_every_step_arrives_in_order_while_the_fit_runs() -> None:
    seen: list[tuple[float, dict[str, Any]]] = []
    strategy = PoolStrategy(on_event=lambda event: seen.append((time.monotonic(), event)))
    t = fit_trainer(strategy, val_check_interval=1.0)
    t.fit(Slow(), loader(), loader())
    returned = time.monotonic()
    kinds = [e["event"] for _, e in seen]
    assert kinds[0] == "start" and kinds[-1] == "end" and seen[-1][1]["error"] is None
    batches = [e for _, e in seen if e["event"] == "train_batch"]
    assert [e["step"] for e in batches] == list(range(1, 9))
    assert all("train_loss" in e["metrics"] for e in batches)
    assert [e["epoch"] for _, e in seen if e["event"] == "epoch_end"] == [0, 1]
    assert [e["event"] for _, e in seen].count("validation") == 2
    assert all("val_loss" in e["metrics"] for _, e in seen if e["event"] == "validation")
    first_step_at = next(ts for ts, e in seen if e["event"] == "train_batch")
    assert returned - first_step_at > 5 * STEP_S, "step 1 arrived only at the end: not streamed"


def test_the_driver_draws_the_only_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar  # the default is rich when rich is installed

    t = fit_trainer(PoolStrategy(), max_epochs=1, enable_progress_bar=True, callbacks=[TQDMProgressBar()])
    t.fit(Regressor(), loader())
    drawn = ""

    def settled() -> bool:  # rank output arrives asynchronously: give it time to show up if any
        nonlocal drawn
        out = capsys.readouterr()
        drawn += out.out + out.err
        return False

    wait_until(settled, 1.0)
    assert "Epoch 0: 100%" in drawn and "4/4" in drawn, drawn  # Lightning's tqdm bar, on stdout as in-process
    assert "[rank 0] Epoch" not in drawn and "[rank 1] Epoch" not in drawn, drawn


class HookRecorder(ProgressBar):
    """A progress bar that records which of its hooks run, and the Trainer as it sees it then."""

    HOOKS = (
        "setup on_fit_start on_sanity_check_start on_sanity_check_end on_train_start on_train_epoch_start "
        "on_train_batch_start on_train_batch_end on_train_epoch_end on_train_end on_validation_start "
        "on_validation_epoch_start on_validation_batch_start on_validation_batch_end on_validation_epoch_end "
        "on_validation_end teardown"
    ).split()

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, ...]] = []

    def __getattribute__(self, name: str) -> Any:
        if name in HookRecorder.HOOKS:

            def record(trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
                # global_step at a batch's start is not known in the driver (the step ran already);
                # progress_bar_metrics are brought up to date where Lightning's bars read them
                step = None if name.endswith("_batch_start") else trainer.global_step
                read = name in ("on_train_batch_end", "on_train_epoch_end", "on_validation_end")
                metrics = sorted(trainer.progress_bar_metrics) if read else None
                fields = (trainer.current_epoch, step, trainer.state.fn, trainer.sanity_checking, trainer.training)
                totals = (trainer.num_training_batches, trainer.num_val_batches, trainer.num_sanity_val_batches)
                self.seen.append((name, len(args), sorted(kwargs.items()), *fields, *totals, metrics))
                if name == "setup":
                    ProgressBar.setup(self, trainer, pl_module, **kwargs)

            return record
        return super().__getattribute__(name)

    def disable(self) -> None:
        pass


def test_the_driver_runs_the_bars_hooks_as_lightning_does_in_process() -> None:
    # The same fit in-process (one rank, half the data: the same 4 batches per epoch) and on the
    # pool: the bar's hooks run in the same order and see the same Trainer fields.
    seen = {}
    for strategy, samples in (("auto", 32), (PoolStrategy(), 64)):
        bar = HookRecorder()
        devices = 1 if strategy == "auto" else 2
        options = {"enable_progress_bar": True, "callbacks": [bar], "devices": devices, "num_sanity_val_steps": 2}
        fit_trainer(strategy, max_epochs=2, **options).fit(Regressor(), loader(samples), loader(samples))
        seen[devices] = bar.seen
    assert [hook[0] for hook in seen[2]].count("on_validation_batch_end") == 2 + 2 * 4
    assert seen[2] == seen[1]


class Broken(TQDMProgressBar):
    def on_train_batch_end(self, *args: Any) -> None:
        raise ValueError("a bug in a custom bar")


def test_a_bar_that_raises_is_reported_once_and_the_fit_goes_on() -> None:
    t = fit_trainer(PoolStrategy(), enable_progress_bar=True, callbacks=[Broken()])
    with pytest.warns(UserWarning, match=r"Broken.on_train_batch_end raised ValueError: a bug in a custom bar") as w:
        t.fit(Regressor(), loader())
    assert t.global_step == 8 and len([x for x in w if "Broken" in str(x.message)]) == 1


class RecordsExceptions(TQDMProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self.exceptions: list[str] = []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.exceptions.append(type(exception).__name__)


def test_ctrl_c_ends_the_bar_before_the_fit_returns(capsys: pytest.CaptureFixture[str]) -> None:
    bar = RecordsExceptions()

    def ctrl_c(event: dict[str, Any]) -> None:  # Ctrl-C lands while the driver handles an event
        if event["event"] == "train_batch" and event["step"] == 2:
            raise KeyboardInterrupt

    t = fit_trainer(PoolStrategy(on_event=ctrl_c), enable_progress_bar=True, callbacks=[bar])
    t.fit(Slow(), loader())
    print("next line")
    assert t.interrupted and bar.exceptions == ["KeyboardInterrupt"]  # on_exception, as in-process
    assert bar.train_progress_bar.disable  # closed: the bar's line is finished
    out = capsys.readouterr().out
    assert "\nnext line\n" in out and "Epoch 0:" in out.split("next line")[0], out


def test_a_service_forwards_a_running_fit_as_server_sent_events() -> None:
    strategy = PoolStrategy()
    t = fit_trainer(strategy)
    fit = threading.Thread(target=t.fit, args=(Slow(), loader()), name="test-fit")

    async def endpoint(request: Request) -> StreamingResponse:
        events = strategy.events()  # registered now: no event of the fit can be missed
        fit.start()

        async def sse() -> Any:
            async for event in events:
                yield protocol.encode_text_event(event)

        return StreamingResponse(sse(), media_type="text/event-stream")

    server, thread, port = serve(Starlette(routes=[Route("/fit", endpoint)]))
    received: list[tuple[float, dict[str, Any]]] = []
    try:
        with httpx.stream("GET", f"http://127.0.0.1:{port}/fit", timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append((time.monotonic(), json.loads(line[len("data: ") :])))
    finally:
        fit.join(timeout=60)
        server.should_exit = True
        thread.join(timeout=30)
    kinds = [e["event"] for _, e in received]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [e["step"] for _, e in received if e["event"] == "train_batch"] == list(range(1, 9))
    first, last = received[0][0], received[-1][0]
    assert last - first > 5 * STEP_S, "the events came in one burst at the end, not as the fit ran"


def test_a_rich_progress_bar_is_drawn_with_rich_in_the_driver(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    t = fit_trainer(PoolStrategy(), max_epochs=1, enable_progress_bar=True, callbacks=[RichProgressBar()])
    t.fit(Regressor(), loader())
    out = capsys.readouterr()
    drawn = out.out + out.err
    assert "Epoch 0/0" in drawn and "4/4" in drawn and "train_loss: " in drawn, drawn  # Lightning's own rich bar
    assert "[rank 0] Epoch" not in drawn and "[rank 1] Epoch" not in drawn  # no bar drawn in a rank
