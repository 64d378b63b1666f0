"""``recovery``: failure detection and recovery times on one world-size-2 pool."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time
from typing import Any

from lightdist.bench.common import CALL_TIMEOUT, START_TIMEOUT, WARMUP_CALLS, Row, format_table, machine, verdict
from lightdist.bench.pool import invoke_times, time_start_stop
from lightdist.errors import WorkerDiedError, WorkerError
from lightdist.runner import DistributedRunner
from lightdist.worker import DistributedWorker


class _FailWorker(DistributedWorker):
    """For ``recovery``: a call that holds (polling ``cancelled``) or fails on demand.

    ``hold``: every rank waits up to that many seconds, returning early once cancelled (the rank that
    is killed meanwhile never returns). ``raise_after``: rank 1 sleeps that long and raises (the
    message ends with ``time.monotonic()`` at the raise, one clock for every process of this machine)
    while rank 0 waits in ``all_reduce`` for it, stuck until the pool kills it.
    """

    def __call__(self, streaming: bool = False, hold: float = 0.0, raise_after: float | None = None) -> int:
        import torch
        import torch.distributed as dist

        if raise_after is not None and self.rank == 1:
            time.sleep(raise_after)
            raise ValueError(f"deliberate failure at {time.monotonic()!r}")
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            if self.cancelled:  # a peer died or failed: the group is broken, leave before any collective
                return -1
            time.sleep(0.001)
        total = torch.ones(1)
        dist.all_reduce(total)
        return int(total.item())


# --- failure detection and recovery ---------------------------------------------------------------

HOLD_S = 10.0  # a held call that only the kill ends; long enough for any delay of the timer
KILL_AFTER_S = 0.2  # the rank is killed this long after the held call was sent
RAISE_AFTER_S = 0.2  # rank 1 raises this long after the call was sent: rank 0 is in all_reduce by then
RECOVERY_ATTEMPTS = 5  # calls tried after a failure before the bench gives up


def until_success(runner: DistributedRunner) -> tuple[float, list[str]]:
    """``time.monotonic()`` when a call first succeeds, and the errors of the calls before it."""
    errors: list[str] = []
    for _ in range(RECOVERY_ATTEMPTS):
        try:
            if runner.invoke_sync({}, timeout=CALL_TIMEOUT) == runner.world_size:
                return time.monotonic(), errors
            raise RuntimeError("a call after recovery returned a wrong value")
        except (WorkerDiedError, WorkerError) as exc:
            errors.append(error_kind(exc))
    raise RuntimeError(f"no call succeeded after {RECOVERY_ATTEMPTS} attempts: {errors}")


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, WorkerError):
        return f"WorkerError(rank {exc.rank}, {exc.exc_type}: {exc.message.splitlines()[0][:60]})"
    return f"{type(exc).__name__}(rank {getattr(exc, 'rank', '?')})"


def live_pid(runner: DistributedRunner, rank: int) -> int:
    """The pid of ``rank``; a respawned rank's pid is reported by the template moments after its fork."""
    deadline = time.monotonic() + CALL_TIMEOUT
    while rank not in runner.pids and time.monotonic() < deadline:
        time.sleep(0.01)
    return runner.pids[rank]


def kill_during_call(runner: DistributedRunner, rank: int) -> dict[str, Any]:
    """(a) SIGKILL of ``rank`` during a held call until the caller's error; (b) then until a call succeeds."""
    pid = live_pid(runner, rank)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, 9)

    timer = threading.Timer(KILL_AFTER_S, kill)
    timer.start()
    try:
        runner.invoke_sync({"hold": HOLD_S}, timeout=CALL_TIMEOUT)
        raise RuntimeError("the held call returned although a rank was killed during it")
    except (WorkerDiedError, WorkerError) as exc:
        failed_at, error = time.monotonic(), error_kind(exc)
    finally:
        timer.join(timeout=CALL_TIMEOUT)
    if not killed_at:
        raise RuntimeError("the held call failed before the rank was killed")
    ok_at, retries = until_success(runner)
    return {"detect_s": failed_at - killed_at[0], "recover_s": ok_at - failed_at, "error": error, "retries": retries}


def raise_in_collective(runner: DistributedRunner) -> dict[str, Any]:
    """(c) rank 1 raises while rank 0 waits in ``all_reduce``, until ``WorkerError``; (d) then until a
    call succeeds (rank 0 is stuck: killed after the grace period and respawned)."""
    try:
        runner.invoke_sync({"raise_after": RAISE_AFTER_S}, timeout=CALL_TIMEOUT)
        raise RuntimeError("the failing call returned")
    except WorkerError as exc:
        failed_at = time.monotonic()
        raised_at = float(exc.message.rsplit(" ", 1)[1])
    ok_at, retries = until_success(runner)
    return {"detect_s": failed_at - raised_at, "recover_s": ok_at - failed_at, "retries": retries}


def kill_while_idle(runner: DistributedRunner, rank: int) -> dict[str, Any]:
    """(e) SIGKILL of an idle ``rank`` until a call succeeds; the first call after it fails by design."""
    pid = live_pid(runner, rank)
    killed_at = time.monotonic()
    os.kill(pid, 9)
    ok_at, errors = until_success(runner)
    return {"recover_s": ok_at - killed_at, "errors": errors}


def measure_recovery(repeats: int, grace: float) -> dict[str, Any]:
    """Each failure ``repeats`` times on one world-size-2 pool (ranks alternate), after a fresh
    world-size-2 start per repeat: the cost of recovering next to the cost of starting over."""
    starts: list[float] = []
    out: dict[str, list[dict[str, Any]]] = {"kill_during_call": [], "raise_in_collective": [], "kill_while_idle": []}
    with contextlib.ExitStack() as stack:
        runner = DistributedRunner(_FailWorker, world_size=2, accelerator="cpu", grace_period=grace)
        stack.callback(runner.stop_sync)
        runner.start_sync(timeout=START_TIMEOUT)
        invoke_times(runner, WARMUP_CALLS)
        for i in range(repeats):
            starts.append(time_start_stop(2)[0])
            out["kill_during_call"].append(kill_during_call(runner, i % 2))
            out["raise_in_collective"].append(raise_in_collective(runner))
            out["kill_while_idle"].append(kill_while_idle(runner, (i + 1) % 2))
    return {"grace_s": grace, "start_ws2_s": starts, **out}


def recovery_rows(data: dict[str, Any]) -> list[Row]:
    def med(section: str, key: str) -> float:
        return float(statistics.median(run[key] for run in data[section]))

    start, grace = float(statistics.median(data["start_ws2_s"])), float(data["grace_s"])
    kill_detect, kill_recover = med("kill_during_call", "detect_s"), med("kill_during_call", "recover_s")
    raise_detect, raise_recover = med("raise_in_collective", "detect_s"), med("raise_in_collective", "recover_s")
    idle_recover = med("kill_while_idle", "recover_s")
    fresh = f"{start:.3f} (pool start)"
    return [
        Row(
            "(a) SIGKILL during a call -> error (s)",
            f"{kill_detect:.3f}",
            target="<= 2 s",
            verdict=verdict(kill_detect <= 2.0),
        ),
        Row("(b) after (a): next call ok (s)", f"{kill_recover:.3f}", fresh, f"{kill_recover / start:.2f}x"),
        Row(
            "(c) rank 1 raises, rank 0 in all_reduce -> error (s)",
            f"{raise_detect:.3f}",
            target="<= 2 s",
            verdict=verdict(raise_detect <= 2.0),
        ),
        Row(
            "(d) after (c): next call ok (s)",
            f"{raise_recover:.3f}",
            f"{grace:.3f} (grace_period)",
            f"{raise_recover / grace:.2f}x" if grace > 0 else "-",
        ),
        Row("(e) SIGKILL while idle -> a call ok (s)", f"{idle_recover:.3f}", fresh, f"{idle_recover / start:.2f}x"),
    ]


def recovery_errors(data: dict[str, Any]) -> str:
    """Which errors the callers saw, counted: the rows time them, this says what they were."""
    seen: dict[str, int] = {}
    for label, section, key in (("(a)", "kill_during_call", "error"), ("(e) first call", "kill_while_idle", "errors")):
        for run in data[section]:
            for error in run[key] if isinstance(run[key], list) else [run[key]]:
                seen[f"{label}: {error}"] = seen.get(f"{label}: {error}", 0) + 1
    retries = sum(len(run["retries"]) for s in ("kill_during_call", "raise_in_collective") for run in data[s])
    lines = [f"  {n} x {what}" for what, n in sorted(seen.items())]
    return "errors seen:\n" + "\n".join(lines) + f"\n  calls that failed after (a)/(c) before one succeeded: {retries}"


def run_recovery(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(
        f"lightdist.bench recovery: {info['date']}, Python {info['python']}, torch {info['torch']}, "
        f"{info['cpus']} CPUs, load {info['loadavg']}, grace_period {args.grace} s",
        flush=True,
    )
    data = measure_recovery(args.repeats, args.grace)
    print(format_table(recovery_rows(data)))
    print(recovery_errors(data))
    return {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, **data}
