"""``python -m lightdist.bench multihost``: a pool across 2 hosts (agents), timed.

Each "host" is a real ``lightdist agent`` process on this machine (loopback TCP, CURVE on), so
network latency is not in the numbers: what they show is lightdist's own cost. Measured, median of
``--repeats``:

- attach: ``start_sync()`` with both agents already running, until every rank is READY, next to a
  single-host pool of the same size started in the same run;
- a no-op ``invoke_sync`` across the 2 hosts (p50, p99) next to the same call on the single-host
  pool (ipc socket, no CURVE);
- a crashed host (SIGKILL of the agent's process tree) during a call: until ``WorkerDiedError``
  (the heartbeat's detection time), and until the next call succeeds on a spare host; once with the
  other host's rank polling ``cancelled``, once with it waiting in an all-reduce for the crashed
  one (its gloo error comes at once and must not pass for the cause: the error type is counted).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lightdist import DistributedRunner, DistributedWorker
from lightdist.bench.common import Row, format_table, free_port, machine, percentile, process_tree


class _Sleeper(DistributedWorker):
    def __call__(self, streaming: bool = False, sleep: float = 0.0, collective: bool = False) -> int:
        if collective and self.rank == 0:  # waits in the all-reduce for rank 1, which sleeps
            import torch
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(1))
            return self.rank
        deadline = time.monotonic() + sleep
        while time.monotonic() < deadline and not self.cancelled:
            time.sleep(0.01)
        return self.rank


def _agent(address: str, key: Path, name: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "lightdist.cli",
        "agent",
        "--connect",
        address,
        "--key-file",
        str(key),
        "--nproc-per-node",
        "1",
        "--host-name",
        name,
        "--connect-timeout",
        "60",
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def _latency(runner: DistributedRunner, calls: int) -> list[float]:
    for _ in range(50):
        runner.invoke_sync({})
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        runner.invoke_sync({})
        samples.append(time.perf_counter() - started)
    return samples


def _crash(pool: DistributedRunner, agents: dict[str, subprocess.Popen[bytes]], collective: bool) -> dict[str, Any]:
    """SIGKILL rank 1's host 0.5 s into a call: (seconds until the caller's error, its type, seconds
    until the next call returned, on a spare)."""
    victim = next(
        name for name, proc in agents.items() if proc.poll() is None and pool.pids.get(1) in process_tree(proc.pid)
    )
    timer = threading.Timer(0.5, _kill_tree, args=(agents[victim],))
    timer.start()
    crashed_at = time.perf_counter() + 0.5
    try:
        pool.invoke_sync({"sleep": 60.0, "collective": collective}, timeout=120)
        error = "none"
    except Exception as exc:  # noqa: BLE001 - which error the caller got is what is measured
        error = type(exc).__name__
    detect = time.perf_counter() - crashed_at
    timer.join()
    pool.invoke_sync({}, timeout=120)
    return {"detect": detect, "error": error, "recover": time.perf_counter() - crashed_at}


def _one_round(keys: tuple[Path, Path], calls: int) -> dict[str, Any]:
    address = f"tcp://127.0.0.1:{free_port()}"
    agents = {name: _agent(address, keys[1], name) for name in ("a", "b", "spare", "spare2")}
    pool = DistributedRunner(_Sleeper, world_size=2, nodes=2, listen=address, key_file=keys[0], accelerator="cpu")
    local = DistributedRunner(_Sleeper, world_size=2, accelerator="cpu")
    out: dict[str, Any] = {}
    try:
        time.sleep(3.0)  # let the agents import and connect: attach time is the pool's, not Python's start
        started = time.perf_counter()
        pool.start_sync(timeout=120)
        out["attach"] = time.perf_counter() - started
        started = time.perf_counter()
        local.start_sync(timeout=120)
        out["local_start"] = time.perf_counter() - started
        out["multi"] = _latency(pool, calls)
        out["local"] = _latency(local, calls)
        out.update(_crash(pool, agents, collective=False))
        out.update({f"collective_{key}": value for key, value in _crash(pool, agents, collective=True).items()})
    finally:
        pool.stop_sync()
        local.stop_sync()
        for proc in agents.values():
            if proc.poll() is None:
                _kill_tree(proc)
    return out


def run_multihost(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.keys import create_pool_keys

    keys = create_pool_keys(tempfile.mkdtemp(prefix="lightdist-bench-keys-"))
    rounds = [_one_round(keys, args.calls) for _ in range(args.repeats)]
    timed = ("attach", "local_start", "detect", "recover", "collective_detect", "collective_recover")
    med = {k: statistics.median(r[k] for r in rounds) for k in timed}
    verdicts = {}
    for kind in ("", "collective_"):
        died = sum(r[f"{kind}error"] == "WorkerDiedError" for r in rounds)
        verdicts[kind] = f"{'PASS' if died == len(rounds) else 'FAIL'} {died}/{len(rounds)}"
    multi = [s for r in rounds for s in r["multi"]]
    local = [s for r in rounds for s in r["local"]]
    p50m, p50l = percentile(multi, 50) * 1e6, percentile(local, 50) * 1e6
    rows = [
        Row(
            "attach 2 hosts x 1 rank (agents running)",
            f"{med['attach']:.2f} s",
            f"{med['local_start']:.2f} s",
            f"{med['attach'] / med['local_start']:.2f}x",
            "-",
            "info",
        ),
        Row(
            "invoke p50 across hosts (tcp+CURVE)",
            f"{p50m:.0f} us",
            f"{p50l:.0f} us",
            f"{p50m / p50l:.2f}x",
            "-",
            "info",
        ),
        Row(
            "invoke p99 across hosts",
            f"{percentile(multi, 99) * 1e6:.0f} us",
            f"{percentile(local, 99) * 1e6:.0f} us",
            "-",
            "-",
            "info",
        ),
        Row("crashed host -> error", f"{med['detect']:.2f} s", "-", "-", "WorkerDiedError", verdicts[""]),
        Row("crashed host -> next call ok (spare)", f"{med['recover']:.2f} s", "-", "-", "-", "info"),
        Row(
            "same, peer in an all-reduce -> error",
            f"{med['collective_detect']:.2f} s",
            "-",
            "-",
            "WorkerDiedError",
            verdicts["collective_"],
        ),
        Row("same -> next call ok (spare)", f"{med['collective_recover']:.2f} s", "-", "-", "-", "info"),
    ]
    print(
        f"2 hosts as local agent processes (loopback), {args.repeats} rounds, {args.calls} calls each; "
        "baseline: a single-host pool of the same size"
    )
    print(format_table(rows))
    return {
        "machine": machine(),
        "rounds": [{k: v for k, v in r.items() if k not in ("multi", "local")} for r in rounds],
    }
