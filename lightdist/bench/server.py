"""``python -m lightdist.bench server``: what a pool that outlives its client buys.

Three contenders run the digits pretrain config from a shell, each measured from the moment the
command is started ("Enter") to rank 0's first training step, and over the whole command:

- ``lightdist fit --server URL``: the thin client, on a server whose pool is already up;
- ``lightdist fit``: a standalone command (imports, then a pool started for it);
- ``lightdist fit --trainer.strategy=ddp_spawn``: Lightning's own multi-process start.

Then four configs back to back: through the server vs as four standalone commands. And the attach
time of a client (connect + authenticate: ``GET /v1/server`` on a fresh connection). The first
step is stamped by :class:`FirstStep`, a callback added to every contender's Trainer from the
command line, so all three are timed by the same clock and the same hook. Peak memory is the PSS
of each command's process tree, plus the server's tree for the server runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightdist.bench.common import Row, format_table, machine, process_tree
from lightdist.bench.recipes import LIGHTDIST, _pss_kib
from lightdist.server._client import Client, find_server

__all__ = ["FirstStep", "run_server"]

_DIGITS = ["--config", "digits/pretrain-cpu", "--trainer.enable_progress_bar=false"]
_TIMEOUT = 600.0


class FirstStep(Callback):
    """Writes the wall-clock time of rank 0's first training batch to ``path`` (once per fit)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.done and trainer.global_rank == 0:
            self.done = True
            Path(self.path).write_text(repr(time.time()))


@dataclass
class Run:
    to_first_step: float
    total: float
    peak_mib: float


def _tree_pss_mib(roots: list[int]) -> float:
    return sum(_pss_kib(pid) for root in roots for pid in process_tree(root)) / 1024


def _run(args: list[str], cwd: Path, stamp: Path, server_pid: int | None = None) -> Run:
    # XDG_STATE_HOME=cwd: a bare --server finds the bench's server (and its token) in cwd/lightdist.
    """``lightdist *args`` with the first-step stamp; time to it, total time, peak PSS (command's
    tree, plus the server's when there is one)."""
    stamp.unlink(missing_ok=True)
    extra = ["--trainer.callbacks+=lightdist.bench.server.FirstStep", f"--trainer.callbacks.path={stamp}"]
    started_wall, started = time.time(), time.perf_counter()
    env = {**os.environ, "XDG_STATE_HOME": str(cwd)}
    proc = subprocess.Popen(
        [LIGHTDIST, *args, *extra], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, _tree_pss_mib([proc.pid, *([server_pid] if server_pid else [])]))

    sampler = threading.Thread(target=sample, name="bench-pss", daemon=True)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=_TIMEOUT)
    finally:
        done.set()
        sampler.join(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    total = time.perf_counter() - started
    if proc.returncode != 0 or not stamp.exists():
        raise SystemExit(f"lightdist {' '.join(args)} failed (exit {proc.returncode}):\n{output[-3000:]}")
    return Run(float(stamp.read_text()) - started_wall, total, peak)


def _start_server(state_dir: Path, devices: int) -> tuple[subprocess.Popen[bytes], str]:
    log = (state_dir.parent / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "lightdist.cli", "serve", "--port", "0", "--state-dir", str(state_dir)]
        + ["--devices", str(devices)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lightdist serve exited {server.returncode}: see {state_dir.parent / 'server.log'}")
        try:
            info = json.loads((state_dir / "server.json").read_text())
            if info["pid"] == server.pid and Client(find_server(state_dir=state_dir)).info()["state"] == "ready":
                return server, info["url"]
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("lightdist serve did not become ready")


def _attach_seconds(state_dir: Path, repeats: int = 20) -> float:
    times = []
    server = find_server(state_dir=state_dir)
    for _ in range(repeats):
        started = time.perf_counter()
        with Client(server) as client:
            client.info()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_server(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="lightdist-bench-server-"))
    state_dir = scratch / "lightdist"  # the default state dir of commands run with XDG_STATE_HOME=scratch
    stamp = scratch / "first-step"
    epochs = [f"--trainer.max_epochs={args.epochs}"]
    server, _ = _start_server(state_dir, args.devices)
    try:
        attach = _attach_seconds(state_dir)
        print(f"attach (connect + authenticate): {attach * 1000:.1f} ms", flush=True)
        remote = ["fit", *_DIGITS, *epochs, "--server"]
        warm_up = _run(remote, scratch, stamp, server.pid)  # the first job imports the recipe in the ranks
        print(f"first job on a fresh server: {warm_up.to_first_step:.2f} s to the first step", flush=True)
        runs: dict[str, list[Run]] = {"server": [], "standalone": [], "ddp_spawn": []}
        commands = {
            "server": remote,
            "standalone": ["fit", *_DIGITS, *epochs],
            "ddp_spawn": ["fit", *_DIGITS, *epochs, "--trainer.strategy=ddp_spawn"],
        }
        for _ in range(args.repeats):  # alternate contenders so machine load hits all alike
            for name, command in commands.items():
                runs[name].append(_run(command, scratch, stamp, server.pid if name == "server" else None))
                print(f"{name}: {runs[name][-1].to_first_step:.2f} s to the first step", flush=True)
        lrs = ["1e-3", "2e-3", "3e-3", "5e-3"]
        four: dict[str, float] = {}
        for name in ("server", "standalone"):
            started = time.perf_counter()
            for lr in lrs:
                _run([*commands[name], f"--model.lr={lr}"], scratch, stamp, server.pid if name == "server" else None)
            four[name] = time.perf_counter() - started
            print(f"four configs, {name}: {four[name]:.1f} s", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    first = {name: statistics.median(r.to_first_step for r in values) for name, values in runs.items()}
    total = {name: statistics.median(r.total for r in values) for name, values in runs.items()}
    peak = {name: max(r.peak_mib for r in values) for name, values in runs.items()}
    rows = [
        Row(
            "attach (connect + authenticate)", f"{attach * 1000:.1f} ms", target="<= 100 ms", verdict=_ok(attach <= 0.1)
        ),
        Row(
            "Enter -> first step, thin client on a warm server",
            f"{first['server']:.2f} s",
            f"{first['standalone']:.2f} s standalone",
            f"{first['standalone'] / first['server']:.1f}x",
            "<= 1 s",
            _ok(first["server"] <= 1.0),
        ),
        Row(
            "Enter -> first step, ddp_spawn command",
            f"{first['ddp_spawn']:.2f} s",
            f"{first['server']:.2f} s server",
            f"{first['ddp_spawn'] / first['server']:.1f}x",
        ),
        Row("whole command, thin client", f"{total['server']:.1f} s", f"{total['standalone']:.1f} s standalone"),
        Row("whole command, ddp_spawn", f"{total['ddp_spawn']:.1f} s"),
        Row(
            "four configs back to back, server",
            f"{four['server']:.1f} s",
            f"{four['standalone']:.1f} s as 4 commands",
            f"{four['standalone'] / four['server']:.1f}x",
        ),
        Row(
            "peak PSS: server tree + client",
            f"{peak['server']:,.0f} MiB",
            f"{peak['standalone']:,.0f} MiB standalone",
        ),
        Row("peak PSS: ddp_spawn command", f"{peak['ddp_spawn']:,.0f} MiB"),
    ]
    print()
    print(format_table(rows))
    print(f"\nfirst job on a fresh server (recipe imported in the ranks): {warm_up.to_first_step:.2f} s")
    print(f"scratch directory: {scratch}")
    return {
        "machine": machine(),
        "attach_s": attach,
        "first_job": warm_up.__dict__,
        "runs": {name: [r.__dict__ for r in values] for name, values in runs.items()},
        "four_configs_s": four,
    }


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"
