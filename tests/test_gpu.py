"""The GPU path: NCCL and ``cuda:<local_rank>`` when the machine has GPUs. Skipped without them
(CI has none); on a GPU machine run ``pytest -m gpu tests/test_gpu.py``, or the whole GPU proof kit,
``python -m lightdist.bench gpu`` (docs/gpu.md), which runs these tests first.

What a driver does with CUDA (``torch.cuda.is_initialized()``) is checked in a fresh driver process
(:func:`fresh_driver`): this pytest process may have initialised CUDA in an earlier test. The fits
there are judged by :func:`lightdist.bench.gpu_fits.fit_once`, the same facts the kit reports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightdist import DistributedRunner, DistributedWorker, WorkerDiedError, WorkerError

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")]
needs_two = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")

ROOT = Path(__file__).resolve().parents[1]
START_S = 180  # a pool start: CUDA context and NCCL set-up included
CALL_S = 60
DRIVER_S = 240  # a fresh driver: imports, a pool start, a fit
RESULT = "RESULT "  # a fresh driver's answer; its ranks' output may come after it on the same stdout


@contextlib.contextmanager
def pool(
    worker_cls: type[DistributedWorker], world_size: int = 1, accelerator: str = "cuda"
) -> Iterator[DistributedRunner]:
    runner = DistributedRunner(worker_cls, world_size=world_size, accelerator=accelerator)
    runner.start_sync(timeout=START_S)
    try:
        yield runner
    finally:
        runner.stop_sync()


def fresh_driver(code: str) -> dict[str, Any]:
    """Run ``code`` as a new driver process; it prints ``RESULT <json>``."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=DRIVER_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith(RESULT))
    found: dict[str, Any] = json.loads(line[len(RESULT) :])
    return found


class CudaWorker(DistributedWorker):
    def setup(self) -> None:
        self.weights = torch.ones(1024, device=self.device) * (self.rank + 1)

    def __call__(self, streaming: bool = False) -> list[object]:
        import torch.distributed as dist

        t = self.weights.clone()
        dist.all_reduce(t)
        info = {
            "device": str(self.device),
            "backend": dist.get_backend(),
            "current": torch.cuda.current_device(),
            "sum": float(t[0].item()),
        }
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, info)
        return gathered


def test_ranks_use_nccl_on_their_own_gpu() -> None:
    world = min(GPUS, 2)
    with pool(CudaWorker, world) as runner:
        infos = runner.invoke_sync(timeout=CALL_S)
    expected_sum = float(sum(range(1, world + 1)))
    for rank, info in enumerate(infos):
        assert info == {"device": f"cuda:{rank}", "backend": "nccl", "current": rank, "sum": expected_sum}


def test_world_size_1_is_nccl_on_cuda_0() -> None:
    with pool(CudaWorker, 1) as runner:
        assert runner.invoke_sync(timeout=CALL_S) == [{"device": "cuda:0", "backend": "nccl", "current": 0, "sum": 1.0}]


class CudaCounter(DistributedWorker):
    def __call__(self, streaming: bool = False, n: int = 0) -> dict[str, object]:
        t = torch.zeros(1, device=self.device)
        for _ in range(n):
            t += 1
            if streaming and self.rank == 0:
                self.add_streaming_result(int(t.item()))
        return {"device": str(t.device), "total": int(t.item())}


def test_stream_from_a_cuda_rank() -> None:
    with pool(CudaCounter) as runner:
        items = list(runner.stream_sync({"n": 1000}, timeout=CALL_S))
    assert items == [*range(1, 1001), {"device": "cuda:0", "total": 1000}]


def test_tensors_from_a_cuda_rank_reach_the_driver_on_cpu_without_cuda() -> None:
    """A result's CUDA tensors leave the rank as CPU tensors, whether or not the worker moved them."""
    found = fresh_driver(f"""
import json, torch
from lightdist import DistributedRunner, DistributedWorker

class Compute(DistributedWorker):
    def __call__(self, streaming=False):
        t = torch.arange(4, device=self.device, dtype=torch.float32) * 2
        return str(t.device), t, t.cpu()

runner = DistributedRunner(Compute, world_size=1, accelerator="cuda")
runner.start_sync(timeout={START_S})
try:
    where, raw, moved = runner.invoke_sync(timeout={CALL_S})
finally:
    runner.stop_sync()
print({RESULT!r} + json.dumps({{"rank": where, "driver": [str(raw.device), str(moved.device)],
                               "values": raw.tolist(), "cuda_initialized": torch.cuda.is_initialized()}}))
""")
    assert found == {
        "rank": "cuda:0",
        "driver": ["cpu", "cpu"],
        "values": [0.0, 2.0, 4.0, 6.0],
        "cuda_initialized": False,
    }


def check_fit(found: dict[str, Any], precision: str, steps: int = 20) -> None:
    from lightdist.bench.gpu_fits import weights_match

    assert found["global_step"] == steps, found
    assert found["weights_changed"] and found["weights_on_cpu"] and weights_match(found), found
    assert found["on_cuda"] == 1.0, found
    assert found["out_bf16"] == float("bf16" in precision), found


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_pool_strategy_fit_on_cuda_leaves_the_driver_without_cuda(precision: str) -> None:
    found = fresh_driver(f"""
import json
from lightdist.bench.gpu_fits import fit_once
print({RESULT!r} + json.dumps(fit_once("cuda", {precision!r}), default=str))
""")
    check_fit(found, precision)
    assert found["driver_cuda_initialized"] is False


def test_driver_that_initialised_cuda_first() -> None:
    """The notebook case: the driver used CUDA before any pool started; a pool call and a fit still work."""
    found = fresh_driver(f"""
import json, torch
torch.zeros(1, device="cuda")
first = torch.cuda.is_initialized()
from lightdist.bench.gpu_fits import fit_once
from lightdist.bench.gpu_parts import new_runner, probe_ok
runner = new_runner("cuda")
runner.start_sync(timeout={START_S})
try:
    probe = runner.invoke_sync({{"probe": True}}, timeout={CALL_S})
finally:
    runner.stop_sync()
print({RESULT!r} + json.dumps({{"first": first, "probe_ok": probe_ok(probe, "cuda", 1),
                               "fit": fit_once("cuda", "32-true", steps=10)}}, default=str))
""")
    assert found["first"] is True and found["probe_ok"] is True, found
    check_fit(found["fit"], "32-true", steps=10)


def test_rank_killed_mid_call_then_the_next_call_works() -> None:
    from lightdist.bench.gpu_parts import _KitWorker, probe_ok

    with pool(_KitWorker) as runner:
        victim = runner.pids[0]
        killer = threading.Timer(0.5, os.kill, args=(victim, signal.SIGKILL))
        killer.start()
        try:
            with pytest.raises(WorkerDiedError) as died:
                runner.invoke_sync({"hold": 30.0}, timeout=CALL_S)  # holds a CUDA context until killed
        finally:
            killer.cancel()
            killer.join(timeout=5)
        assert died.value.rank == 0 and died.value.signal == signal.SIGKILL
        after = runner.invoke_sync({"probe": True}, timeout=CALL_S)
    assert probe_ok(after, "cuda", 1) and after["pid"] != victim, after


def test_accelerator_cpu_forces_gloo_on_a_gpu_machine() -> None:
    class Where(DistributedWorker):
        def __call__(self, streaming: bool = False) -> tuple[str, str]:
            import torch.distributed as dist

            return str(self.device), dist.get_backend()

    with pool(Where, 2, accelerator="cpu") as runner:
        assert runner.invoke_sync(timeout=CALL_S) == ("cpu", "gloo")


def test_too_many_ranks_for_the_gpus_is_a_clear_error() -> None:
    runner = DistributedRunner(CudaWorker, world_size=GPUS + 1, accelerator="cuda")
    with pytest.raises(WorkerError, match="accelerator='cuda'"):
        runner.start_sync(timeout=START_S)


@needs_two
def test_world_size_2_pool_strategy_fit() -> None:
    found = fresh_driver(f"""
import json
from lightdist.bench.gpu_fits import fit_once
print({RESULT!r} + json.dumps(fit_once("cuda", "32-true", devices=2), default=str))
""")
    check_fit(found, "32-true")
    assert len(found["pids"]) == 2 and found["driver_cuda_initialized"] is False, found
