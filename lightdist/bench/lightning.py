"""``lightning``: Trainer fits on the warm pool next to ``ddp_spawn`` and an already-warm ``ddp`` group.

Run: ``python -m lightdist.bench lightning [--fits 5] [--steps 20] [--throughput-steps 300]``.

Every fit is a new Trainer and a new tiny MLP on 2 CPU ranks (gloo), with synthetic data made inside
the ranks (``SyntheticData.train_dataloader``). The contenders run in rounds — a ``ddp_spawn`` fit,
then a pool fit and a fit of the warm ``ddp`` group, in swapped order every other round — so load
from other jobs hits them alike; the throughput fits (pool, warm ``ddp``) alternate the same way.
The ``ddp`` group lives in a generated script (``strategy="ddp"`` re-executes the script per rank)
whose rank 0 waits for a line on stdin before each fit and prints its times as JSON lines; rank 1
is started by Lightning inside the first fit and just follows the same sequence of fits.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightdist.bench.common import CALL_TIMEOUT, START_TIMEOUT, Row, format_table, free_port, machine, verdict

WORLD_SIZE = 2
BATCH = 32
FEATURES = 32
MARK = "LIGHTDIST_BENCH "  # prefix of the script's result lines (rank 1 shares its stdout)
WARMUP_STEPS = 10  # training steps before the throughput timer starts
SPAWN_TRIES = 3  # ddp_spawn attempts per fit before the benchmark gives up


class MLP(L.LightningModule):
    """The tiny model: training is a small part of a 20-step fit, so overheads show."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SyntheticData(L.LightningDataModule):
    """Exactly one epoch of ``steps`` batches per rank, generated where the loader is built."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.samples = steps * BATCH * WORLD_SIZE

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        x = torch.randn(self.samples, FEATURES, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=BATCH)


class StepsPerSecond(Callback):
    """Times training on the rank itself and logs ``bench_steps_per_s`` at the last step; logged
    metrics reach the driver in ``callback_metrics`` (the pool sends rank 0's back)."""

    def __init__(self) -> None:
        self.t0 = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == WARMUP_STEPS:
            self.t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == trainer.max_steps:  # the step counter has already moved on here
            rate = (trainer.max_steps - WARMUP_STEPS) / (time.perf_counter() - self.t0)
            pl_module.log("bench_steps_per_s", rate, on_step=True, on_epoch=False)


def timed_fit(strategy: str, steps: int, timer: bool = False) -> tuple[float, float]:
    """Seconds for one fit (new Trainer, new model) and, with ``timer``, rank 0's training steps/s."""
    model, data = MLP(), SyntheticData(steps)
    t0 = time.perf_counter()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=WORLD_SIZE,
        max_steps=steps,
        callbacks=[StepsPerSecond()] if timer else [],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - t0
    return seconds, float(trainer.callback_metrics["bench_steps_per_s"]) if timer else 0.0


def spawn_fit(steps: int, failures: list[str]) -> float:
    """A ``ddp_spawn`` fit; a run whose processes die (SIGABRT at exit, seen in about 1 of 5) is
    recorded in ``failures`` and retried."""
    from torch.multiprocessing.spawn import ProcessExitedException

    for _ in range(SPAWN_TRIES):
        os.environ.pop("MASTER_PORT", None)  # ddp_spawn leaves its port here: pick a fresh free one each fit
        try:
            return timed_fit("ddp_spawn", steps)[0]
        except ProcessExitedException as exc:
            failures.append(str(exc).splitlines()[0])
    raise RuntimeError(f"ddp_spawn failed {SPAWN_TRIES} times in a row: {failures[-SPAWN_TRIES:]}")


# --- the warm ddp group, in a script of its own ---------------------------------------------------

_DDP_SCRIPT = """
import json, sys
from lightdist.bench.lightning import MARK, timed_fit

fits, steps, throughput_steps, repeats = map(int, sys.argv[1:5])
rank0 = "LOCAL_RANK" not in __import__("os").environ  # rank 1 is started with LOCAL_RANK set
if rank0:
    print(MARK + "{}", flush=True)  # imported: ready
for kind in ["fit"] * fits + ["throughput"] * repeats:
    if rank0 and not sys.stdin.readline():  # wait for the driver: its other contenders run meanwhile
        break
    s, rate = timed_fit("ddp", throughput_steps if kind == "throughput" else steps, timer=kind == "throughput")
    if rank0:
        print(MARK + json.dumps({"seconds": s, "steps_per_s": rate}), flush=True)
"""


class WarmDDP:
    """The script's rank 0 in a new session (so its rank 1 can be killed with it), its result lines
    read by a thread; every wait has a deadline and ``close`` leaves no process behind."""

    def __init__(self, fits: int, steps: int, throughput_steps: int, repeats: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="lightdist-bench-")
        script = os.path.join(self._dir.name, "warm_ddp.py")
        with open(script, "w") as f:
            f.write(_DDP_SCRIPT)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "PL_GLOBAL_SEED", "OMP_NUM_THREADS")
        }
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        self._stderr: IO[bytes] = open(os.path.join(self._dir.name, "stderr"), "w+b")
        self._proc = subprocess.Popen(
            [sys.executable, script, str(fits), str(steps), str(throughput_steps), str(repeats)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="bench-ddp-reader", daemon=True)
        self._reader.start()
        try:
            self._result(START_TIMEOUT)  # imports done: nothing of it overlaps the first measured fit
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(MARK):
                self._lines.put(line[len(MARK) :])
        self._lines.put(None)  # end of output

    def _result(self, timeout: float) -> dict[str, float]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the ddp script sent no result for {timeout} s{self._stderr_tail()}") from None
        if line is None:
            raise RuntimeError(f"the ddp script ended (exit code {self._proc.poll()}){self._stderr_tail()}")
        return dict(json.loads(line))

    def fit(self, timeout: float = START_TIMEOUT) -> dict[str, float]:
        """Let rank 0 run its next fit; its seconds and steps/s."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()
        return self._result(timeout)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return "; its stderr ends:\n" + self._stderr.read()[-3000:].decode(errors="replace")

    def close(self) -> int:
        """Ends the script (EOF on stdin), waits for both ranks, kills what is left; rank 0's exit code."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()  # EOF: rank 0 leaves its loop
        try:
            self._proc.wait(timeout=CALL_TIMEOUT)
            deadline = time.monotonic() + CALL_TIMEOUT
            while time.monotonic() < deadline and _group_alive(self._proc.pid):  # rank 1 finishing its exit
                time.sleep(0.05)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if _group_alive(self._proc.pid):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=CALL_TIMEOUT)
            self._reader.join(timeout=CALL_TIMEOUT)
            self._stderr.close()
            self._dir.cleanup()
        return self._proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# --- the rounds -----------------------------------------------------------------------------------


def in_turn(i: int, first: Callable[[], None], second: Callable[[], None]) -> None:
    """Both, in swapped order every other time: drift in the machine's load favours neither."""
    for run in (first, second) if i % 2 == 0 else (second, first):
        run()


def measure_lightning(fits: int, steps: int, throughput_steps: int, repeats: int) -> dict[str, Any]:
    import lightdist.lightning  # noqa: F401 - registers strategy="lightdist"
    from lightdist.lightning import strategy as strategy_module

    out: dict[str, Any] = {
        "pool_s": [],
        "spawn_s": [],
        "ddp_s": [],
        "spawn_failures": [],
        "pool_steps_per_s": [],
        "ddp_steps_per_s": [],
        "timed_steps": throughput_steps - WARMUP_STEPS,
    }
    ddp = WarmDDP(fits, steps, throughput_steps, repeats)
    try:
        for i in range(fits):
            out["spawn_s"].append(spawn_fit(steps, out["spawn_failures"]))
            in_turn(
                i,
                lambda: out["pool_s"].append(timed_fit("lightdist", steps)[0]),  # the 1st starts the pool
                lambda: out["ddp_s"].append(ddp.fit()["seconds"]),
            )  # the 1st starts rank 1 and the group
        for i in range(repeats):
            in_turn(
                i,
                lambda: out["pool_steps_per_s"].append(timed_fit("lightdist", throughput_steps, timer=True)[1]),
                lambda: out["ddp_steps_per_s"].append(ddp.fit()["steps_per_s"]),
            )
    finally:
        out["ddp_exit_code"] = ddp.close()
        for runner in list(strategy_module._pools.values()):
            runner.stop_sync()
        strategy_module._pools.clear()
    return out


def lightning_rows(data: dict[str, Any]) -> list[Row]:
    pool, spawn, ddp = (statistics.median(data[k][1:] or data[k]) for k in ("pool_s", "spawn_s", "ddp_s"))
    pool_rate, ddp_rate = statistics.median(data["pool_steps_per_s"]), statistics.median(data["ddp_steps_per_s"])
    n = len(data["pool_s"])
    warm = f"median of fits 2-{n}" if n > 2 else "fit 2" if n == 2 else "fit 1"
    failures = len(data["spawn_failures"])
    return [
        Row(
            "pool fit 1, includes pool start (s)",
            f"{data['pool_s'][0]:.3f}",
            f"{data['spawn_s'][0]:.3f} (ddp_spawn)",
            f"{data['pool_s'][0] / data['spawn_s'][0]:.2f}x",
        ),
        Row(
            f"ddp_spawn fit, {warm} (s)",
            f"{spawn:.3f}",
            f"{pool:.3f} (pool)",
            f"{spawn / pool:.1f}x",
            ">= 20x",
            verdict(spawn / pool >= 20),
        ),
        Row("ddp_spawn runs died at exit, retried", f"{failures} of {n + failures}"),
        Row(
            f"pool fit, {warm} (s)",
            f"{pool:.3f}",
            f"{ddp:.3f} (warm ddp)",
            f"{pool / ddp:.2f}x",
            "<= 1.2x",
            verdict(pool / ddp <= 1.2),
        ),
        Row("warm ddp fit 1, starts rank 1 (s)", f"{data['ddp_s'][0]:.3f}"),
        Row(
            f"pool training, {data['timed_steps']} steps (steps/s)",
            f"{pool_rate:.1f}",
            f"{ddp_rate:.1f} (ddp)",
            f"{pool_rate / ddp_rate:.2f}x",
            ">= 0.97x",
            verdict(pool_rate / ddp_rate >= 0.97),
        ),
    ]


def run_lightning(args: argparse.Namespace) -> dict[str, Any]:
    if args.throughput_steps <= WARMUP_STEPS:
        raise SystemExit(f"--throughput-steps must be more than {WARMUP_STEPS}: the first {WARMUP_STEPS} are not timed")
    info = machine()
    print(
        f"lightdist.bench lightning: {info['date']}, Python {info['python']}, torch {info['torch']}, "
        f"lightning {L.__version__}, {info['cpus']} CPUs, load {info['loadavg']}",
        flush=True,
    )
    data = measure_lightning(args.fits, args.steps, args.throughput_steps, args.throughput_repeats)
    print(format_table(lightning_rows(data)))
    for key in ("pool_s", "spawn_s", "ddp_s", "pool_steps_per_s", "ddp_steps_per_s"):
        print(f"  {key}: {', '.join(f'{v:.3f}' for v in data[key])}")
    for failure in data["spawn_failures"]:
        print(f"  ddp_spawn died: {failure}")
    print(f"  warm ddp script exit code: {data['ddp_exit_code']}")
    return {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, **data}
