"""``python -m lightdist.bench thin``: Enter to the first training step, through a warm server.

The issue 13 target: ``lightdist fit --config digits/pretrain-cpu --server`` reaches its first
training step within 1 s of Enter on a warm server (a local ``lightdist fit`` takes 7-10 s: it
imports Lightning and starts a pool). Both contenders run the same command line, each as a new
process, as a user types it:

- **thin**: ``lightdist fit ... --server`` against a ``lightdist serve`` started once (and warmed
  by one job, which pays the server's first imports of the recipe). The first step is the time of
  the job's first ``train_batch`` event (the server stamps it as rank 0 reports the step).
- **local**: ``lightdist fit ...`` on its own pool, the baseline. The first step is stamped by
  :class:`FirstStep`, a callback on rank 0 that prints the time after the first training batch.

Both stamps are wall-clock times on this host, taken after the first batch's ``training_step``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightdist.bench.common import Row, format_table, machine

COMMAND = ["fit", "--config", "digits/pretrain-cpu", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]
TARGET_S = 1.0
TIMEOUT_S = 300.0
_STAMP = "lightdist-bench-first-step"


class FirstStep(Callback):
    """Prints the wall time after the first training batch, on rank 0 (the pool forwards its output)."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 1 and trainer.global_rank == 0:
            print(f"{_STAMP} {time.time():.6f}", flush=True)


def run_thin(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lightdist-bench-thin-"))
    state_dir = work / "state" / "lightdist"
    env = {**os.environ, "XDG_STATE_HOME": str(state_dir.parent), "PYTHONUNBUFFERED": "1"}
    server = _start_server(state_dir, env, work)
    try:
        thin = [_thin_fit(work, env, state_dir) for _ in range(args.fits + 1)][1:]  # the first warms the server
    finally:
        server.terminate()
        server.wait(60)
    local = [_local_fit(work, env) for _ in range(args.local_fits)]
    first_thin = statistics.median(t["first_step"] for t in thin)
    first_local = statistics.median(t["first_step"] for t in local)
    rows = [
        Row(
            "Enter -> first step, thin client (median)",
            f"{first_thin:.2f} s",
            f"{first_local:.2f} s local",
            f"{first_thin / first_local:.2f}x",
            f"<= {TARGET_S:.0f} s",
            "PASS" if first_thin <= TARGET_S else "FAIL",
        ),
        Row("  of which: until queued (client start, submit, config check)", f"{_median(thin, 'queued'):.2f} s"),
        Row(
            "  of which: queued -> Trainer call on the ranks",
            f"{_median(thin, 'run_start') - _median(thin, 'queued'):.2f} s",
        ),
        Row(
            "Enter -> exit, 1 epoch (median)",
            f"{_median(thin, 'exit'):.2f} s",
            f"{_median(local, 'exit'):.2f} s local",
            f"{_median(thin, 'exit') / _median(local, 'exit'):.2f}x",
        ),
    ]
    print(machine())
    print(format_table(rows))
    return {"thin": thin, "local": local}


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _start_server(state_dir: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    from lightdist.server._client import Client, find_server

    command = [sys.executable, "-m", "lightdist.cli", "serve", "--port", "0", "--state-dir", str(state_dir)]
    log = (cwd / "server.log").open("w")
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lightdist serve exited {proc.returncode}: {(cwd / 'server.log').read_text()}")
        try:
            if Client(find_server(state_dir=state_dir)).info()["state"] == "ready":
                return proc
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"lightdist serve was not ready within {TIMEOUT_S} s")


def _thin_fit(work: Path, env: dict[str, str], state_dir: Path) -> dict[str, float]:
    from lightdist.server._client import Client, find_server

    started, ended, done = _timed([*COMMAND, "--server"], work, env)
    if done.returncode != 0:
        raise RuntimeError(f"the thin client exited {done.returncode}: {done.stderr}")
    job_id = int(re.search(r"job (\d+) on", done.stderr).group(1))  # type: ignore[union-attr]
    stamps: dict[str, float] = {}
    with Client(find_server(state_dir=state_dir)) as client:
        for _, kind, data in client.events(job_id):
            stamps.setdefault(kind, float(data["time"]))
    return {
        "queued": stamps["queued"] - started,
        "run_start": stamps["run_start"] - started,
        "first_step": stamps["train_batch"] - started,
        "exit": ended - started,
    }


def _local_fit(work: Path, env: dict[str, str]) -> dict[str, float]:
    callback = f"--trainer.callbacks+={__name__}.FirstStep"
    started, ended, done = _timed([*COMMAND, callback], work, env)
    stamp = re.search(rf"{_STAMP} ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode != 0 or stamp is None:
        raise RuntimeError(f"lightdist fit exited {done.returncode}: {done.stderr[-2000:]}")
    return {"first_step": float(stamp.group(1)) - started, "exit": ended - started}


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """``lightdist *args`` as a new process (as typed); its start and end as wall-clock times."""
    started = time.time()
    command = [sys.executable, "-m", "lightdist.cli", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return started, time.time(), done
