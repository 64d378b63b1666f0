"""The parts of ``python -m lightdist.bench gpu`` that need no Lightning, and the entry point of every part.

Each part runs as a process of its own (``python -m lightdist.bench.gpu_parts NAME --accelerator
cuda``), so that the kit (:mod:`lightdist.bench.gpu`) can kill it on a hang, and so that every part
starts as a fresh driver: ``torch.cuda.is_initialized()`` then speaks of that part alone. A part
prints its outcome as the last line, ``LIGHTDIST_GPU_PART {json}``: rows for the table, named checks
(any false one fails the part) and raw details.

The Lightning parts live in :mod:`lightdist.bench.gpu_fits`, imported only for them: ranks unpickle
:class:`_KitWorker` by importing this module, and a pool's start time must not include Lightning's
import.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from lightdist.bench.common import WARMUP_ITEMS, percentile
from lightdist.bench.pool import _BenchWorker, invoke_times, stream_once
from lightdist.errors import WorkerDiedError, WorkerError
from lightdist.runner import DistributedRunner

MARK = "LIGHTDIST_GPU_PART "
ROW_MARK = "LIGHTDIST_GPU_ROW "  # each row as it is found: a part killed on a hang still says how far it got
START_S = 180.0  # one pool start, CUDA context and NCCL set-up included; the part's hard limit is the real bound
CALL_S = 60.0
PG_TIMEOUT_S = 120  # a collective stuck this long fails (NCCL aborts) instead of holding the part to its limit
WARMUP_CALLS = 50
CALLS = 200
ITEMS = 5000
KILL_AFTER_S = 0.5  # the held call is surely running on the rank by then
RECOVERY_TRIES = 5


class Outcome:
    """What one part found. ``skip`` (a reason) marks a part that could not run here."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.checks: dict[str, bool] = {}
        self.details: dict[str, Any] = {}
        self.skip: str | None = None

    def row(self, metric: str, value: object) -> None:
        self.rows.append((metric, value if isinstance(value, str) else json.dumps(value, default=str)))
        print(ROW_MARK + json.dumps(self.rows[-1]), flush=True)

    def check(self, name: str, ok: object) -> bool:
        self.checks[name] = bool(ok)
        print(f"check: {name}: {'ok' if ok else 'FAILED'}", flush=True)
        return bool(ok)

    def to_json(self) -> dict[str, Any]:
        failed = [name for name, ok in self.checks.items() if not ok]
        status = f"skipped: {self.skip}" if self.skip else "failed" if failed else "passed"
        return {
            "status": status,
            "rows": self.rows,
            "checks": self.checks,
            "failed_checks": failed,
            "details": self.details,
        }


class _KitWorker(_BenchWorker):
    """``_BenchWorker``'s no-op call and stream (what the pool's overhead is measured with), plus:

    ``probe``: a collective on the rank's device and where the rank runs; ``hold``: a call that sits
    on the device until cancelled or killed; ``raw_tensor``: a tensor on the rank's device, returned
    as it is (it must reach the driver on CPU).
    """

    def __call__(
        self,
        streaming: bool = False,
        n: int = 0,
        probe: bool = False,
        hold: float = 0.0,
        raw_tensor: bool = False,
        **kwargs: Any,
    ) -> Any:
        import torch
        import torch.distributed as dist

        if raw_tensor:
            return torch.full((2,), float(self.rank + 1), device=self.device)
        if probe:
            t = torch.full((4,), float(self.rank + 1), device=self.device)
            dist.all_reduce(t)
            devices: list[object] = [None] * self.world_size
            dist.all_gather_object(devices, str(self.device))
            return {
                "devices": devices,
                "backend": dist.get_backend(),
                "sum": float(t[0].item()),
                "tensor": t.cpu(),
                "pid": os.getpid(),
            }
        if hold:
            t = torch.ones(1, device=self.device)  # the rank holds a CUDA context when the kill lands
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline and not self.cancelled:
                time.sleep(0.01)
            return float(t.item())
        return super().__call__(streaming, n=n)


def expected_probe(accelerator: str, world_size: int) -> dict[str, Any]:
    devices = [f"cuda:{r}" if accelerator == "cuda" else "cpu" for r in range(world_size)]
    return {
        "devices": devices,
        "backend": "nccl" if accelerator == "cuda" else "gloo",
        "sum": float(world_size * (world_size + 1) / 2),
    }


def probe_ok(found: Any, accelerator: str, world_size: int) -> bool:
    return isinstance(found, dict) and all(
        found.get(k) == v for k, v in expected_probe(accelerator, world_size).items()
    )


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (what a driver should not need to do)."""
    import torch

    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def new_runner(accelerator: str, world_size: int = 1) -> DistributedRunner:
    return DistributedRunner(_KitWorker, world_size=world_size, accelerator=accelerator, timeout=PG_TIMEOUT_S)


# --- the parts ------------------------------------------------------------------------------------


def pool_numbers(accelerator: str) -> dict[str, Any]:
    """Start time, invoke p50 and stream rate of a world-size-1 pool, and what its probe returned."""
    runner = new_runner(accelerator)
    try:
        t0 = time.perf_counter()
        runner.start_sync(timeout=START_S)
        start_s = time.perf_counter() - t0
        probe = runner.invoke_sync({"probe": True}, timeout=CALL_S)
        invoke_times(runner, WARMUP_CALLS)
        p50_ms = percentile(invoke_times(runner, CALLS), 50) * 1e3
        stream_once(runner, WARMUP_ITEMS)
        stream = stream_once(runner, ITEMS)
        raw = runner.invoke_sync({"raw_tensor": True}, timeout=CALL_S)
    finally:
        runner.stop_sync()
    return {
        "start_s": start_s,
        "invoke_p50_ms": p50_ms,
        "items_per_s": ITEMS / stream["seconds"],
        "stream_complete": stream["received"] == ITEMS and stream["in_order"],
        "probe": probe,
        "raw_tensor_device": str(raw.device),
    }


def part_pool(accelerator: str, out: Outcome, **_: Any) -> None:
    """(b) A world-size-1 pool on ``accelerator`` next to the same on CPU ranks, in the same run."""
    for acc in dict.fromkeys([accelerator, "cpu"]):
        nums = pool_numbers(acc)
        probe = nums.pop("probe")
        out.details[acc] = {**nums, "probe": {k: v for k, v in probe.items() if k != "tensor"}}
        out.check(
            f"{acc}: rank on {expected_probe(acc, 1)['devices'][0]}, backend {expected_probe(acc, 1)['backend']}",
            probe_ok(probe, acc, 1),
        )
        out.check(f"{acc}: a .cpu() tensor from the rank arrives on cpu", probe["tensor"].device.type == "cpu")
        # Results leave a GPU rank as CPU tensors, so that the driver never needs CUDA.
        out.check(f"{acc}: a tensor returned as it is arrives on cpu", nums["raw_tensor_device"] == "cpu")
        out.check(f"{acc}: {ITEMS} stream items arrive, in order", nums["stream_complete"])
        out.row(f"{acc} ws=1 start (s)", f"{nums['start_s']:.2f}")
        out.row(f"{acc} invoke p50 (ms)", f"{nums['invoke_p50_ms']:.3f}")
        out.row(f"{acc} stream (items/s)", f"{nums['items_per_s']:,.0f}")
    out.check("driver did not initialise CUDA", not cuda_initialized())


def part_kill(accelerator: str, out: Outcome, **_: Any) -> None:
    """(f) SIGKILL a rank during a call: ``WorkerDiedError``, then the next call works (recovery)."""
    runner = new_runner(accelerator)
    try:
        runner.start_sync(timeout=START_S)
        first = runner.invoke_sync({"probe": True}, timeout=CALL_S)
        out.check("probe before the kill", probe_ok(first, accelerator, 1))
        victim = runner.pids[0]
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(victim, signal.SIGKILL)

        timer = threading.Timer(KILL_AFTER_S, kill)
        timer.start()
        error: BaseException | None = None
        try:
            runner.invoke_sync({"hold": 30.0}, timeout=CALL_S)
        except (WorkerDiedError, WorkerError, TimeoutError) as exc:
            error = exc
        failed_at = time.monotonic()
        timer.join(timeout=10)
        out.details["error"] = repr(error)
        if out.check("the call raised WorkerDiedError", isinstance(error, WorkerDiedError)) and killed_at:
            out.row("SIGKILL -> WorkerDiedError (s)", f"{failed_at - killed_at[0]:.3f}")
        errors: list[str] = []
        for _attempt in range(RECOVERY_TRIES):
            try:
                after = runner.invoke_sync({"probe": True}, timeout=CALL_S)
                break
            except (WorkerDiedError, WorkerError) as exc:
                errors.append(repr(exc))
        else:
            after = None
        recovered_at = time.monotonic()
        out.details["errors_before_recovery"] = errors
        if out.check("the next call works (recovered)", probe_ok(after, accelerator, 1)):
            out.row("WorkerDiedError -> next call ok (s)", f"{recovered_at - failed_at:.3f}")
            out.check("the rank was respawned (new pid)", after is not None and after["pid"] != victim)
        out.row("calls failed before recovery", len(errors))
    finally:
        runner.stop_sync()


def part_world_size_2(accelerator: str, out: Outcome, **_: Any) -> None:
    """(g) World size 2: all_reduce sum and devices, then a 2-device PoolStrategy fit."""
    from lightdist.bench.gpu_fits import check_fit, fit_once

    runner = new_runner(accelerator, world_size=2)
    try:
        t0 = time.perf_counter()
        runner.start_sync(timeout=START_S)
        out.row("ws=2 start (s)", f"{time.perf_counter() - t0:.2f}")
        probe = runner.invoke_sync({"probe": True}, timeout=CALL_S)
    finally:
        runner.stop_sync()
    out.details["probe"] = {k: v for k, v in probe.items() if k != "tensor"}
    out.check("all_reduce sum 3.0 on both ranks' devices", probe_ok(probe, accelerator, 2))
    result = fit_once(accelerator, "32-true", devices=2)
    check_fit(out, "2-device fit", result, accelerator, "32-true")


def machine_info() -> dict[str, Any]:
    """This machine as torch sees it (initialises CUDA: run it as a process of its own)."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    gpus = torch.cuda.device_count() if info["cuda_available"] else 0
    info["gpus"] = gpus
    info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(gpus)]
    if gpus:
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))  # type: ignore[no-untyped-call]
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
        try:
            info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = repr(exc)
    return info


def part_info(accelerator: str, out: Outcome, **_: Any) -> None:
    out.details.update(machine_info())


# Lightning parts by name, imported only when run (see the module docstring).
PARTS: dict[str, str] = {
    "info": f"{__name__}:part_info",
    "pool": f"{__name__}:part_pool",
    "fits": "lightdist.bench.gpu_fits:part_fits",
    "configs": "lightdist.bench.gpu_fits:part_configs",
    "notebook": "lightdist.bench.gpu_fits:part_notebook",
    "kill": f"{__name__}:part_kill",
    "ws2": f"{__name__}:part_world_size_2",
    "warm": "lightdist.bench.gpu_fits:part_warm_models",
}


def resolve(name: str) -> Callable[..., None]:
    module, _, func = PARTS[name].partition(":")
    found: Callable[..., None] = getattr(importlib.import_module(module), func)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightdist.bench.gpu_parts")
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--scratch", default=".", help="a directory the part may write in (configs run there)")
    parser.add_argument("--seconds", type=float, default=120.0, help="the part's time limit (it is killed after)")
    args = parser.parse_args(argv)
    out = Outcome()
    deadline = time.monotonic() + args.seconds
    resolve(args.part)(args.accelerator, out, scratch=args.scratch, deadline=deadline)
    print(MARK + json.dumps(out.to_json(), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
