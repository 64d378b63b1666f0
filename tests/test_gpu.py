"""The GPU path: NCCL and ``cuda:<local_rank>`` when the machine has GPUs. Skipped without them
(CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from lightdist import DistributedRunner, DistributedWorker

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")]


class CudaWorker(DistributedWorker):
    def setup(self) -> None:
        self.weights = torch.ones(1024, device=self.device) * (self.rank + 1)

    def __call__(self, streaming: bool = False) -> dict[str, object]:
        import torch.distributed as dist

        t = self.weights.clone()
        dist.all_reduce(t)
        info = {"device": str(self.device), "backend": dist.get_backend(), "current": torch.cuda.current_device(),
                "sum": float(t[0].item())}
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, info)
        return gathered


def test_ranks_use_nccl_on_their_own_gpu() -> None:
    world = min(GPUS, 2)
    with DistributedRunner(CudaWorker, world_size=world) as runner:
        infos = runner.invoke_sync(timeout=120)
    expected_sum = float(sum(range(1, world + 1)))
    for rank, info in enumerate(infos):
        assert info == {"device": f"cuda:{rank}", "backend": "nccl", "current": rank, "sum": expected_sum}


def test_accelerator_cpu_forces_gloo_on_a_gpu_machine() -> None:
    class Where(DistributedWorker):
        def __call__(self, streaming: bool = False) -> tuple[str, str]:
            import torch.distributed as dist

            return str(self.device), dist.get_backend()

    with DistributedRunner(Where, world_size=2, accelerator="cpu") as runner:
        assert runner.invoke_sync(timeout=60) == ("cpu", "gloo")


def test_too_many_ranks_for_the_gpus_is_a_clear_error() -> None:
    from lightdist import WorkerError

    runner = DistributedRunner(CudaWorker, world_size=GPUS + 1, accelerator="cuda")
    with pytest.raises(WorkerError, match="accelerator='cuda'"):
        runner.start_sync(timeout=120)
