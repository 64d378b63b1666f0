"""The three "Common Patterns" of the seed API (../shared/seed-api.md), as written there, adapted
only for CPU: gloo instead of NCCL, ``cpu`` instead of ``cuda:N``, a tiny model instead of a
pretrained one. Each runs on a real 2-rank pool."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import torch

from lightdist import DistributedRunner, DistributedWorker


class TinyGenerator:
    """Stands in for ``load_model()``: output depends on the prompt and on the rank's seed."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def generate(self, prompt: str) -> torch.Tensor:
        return torch.tensor([float(len(prompt)), float(self.rank)])

    def step(self, prompt: str) -> torch.Tensor:
        return torch.tensor([float(len(prompt) + self.rank)])


# --- Pattern 1: data parallelism (inference) -------------------------------------------------------
class ParallelWorker(DistributedWorker):
    def setup(self, **kwargs):  # type: ignore[no-untyped-def]
        self.model = TinyGenerator(self.rank)

    def __call__(self, prompt: str, **kwargs):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        # Each GPU generates independently with different seed
        result = self.model.generate(prompt)

        # Gather all results to rank 0
        if self.rank == 0:
            gather_list = [torch.zeros_like(result) for _ in range(self.world_size)]
        else:
            gather_list = None

        dist.gather(result, gather_list, dst=0)

        # Only rank 0 returns combined result
        if self.rank == 0:
            return {"outputs": gather_list}
        return {}


def test_pattern_data_parallel_gather_to_rank0() -> None:
    """Every rank's output is gathered to rank 0 and returned by invoke()."""

    async def main() -> dict:
        runner = DistributedRunner(worker_cls=ParallelWorker, world_size=2)
        await runner.start()
        try:
            return await runner.invoke({"prompt": "hello"})
        finally:
            await runner.stop()

    out = asyncio.run(main())
    assert [t.tolist() for t in out["outputs"]] == [[5.0, 0.0], [5.0, 1.0]]


# --- Pattern 2: distributed data parallel (training) -----------------------------------------------
class MyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank, as a pretrained checkpoint would be
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x, y = batch[:, :4], batch[:, 4:]
        return torch.nn.functional.mse_loss(self.linear(x), y)


def load_data(data_path: str) -> list[torch.Tensor]:
    return torch.load(data_path)


class DDPWorker(DistributedWorker):
    def setup(self, **kwargs):  # type: ignore[no-untyped-def]
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model = MyModel().to(self.device)

        # Wrap with DDP for gradient synchronization (CPU: no device_ids)
        self.model = DDP(self.model)

        self.optimizer = torch.optim.Adam(self.model.parameters())

    def __call__(self, data_path: str, **kwargs):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        # Load and distribute data
        if self.rank == 0:
            data = load_data(data_path)
        else:
            data = None

        # Broadcast to all ranks. (The seed writes `data = dist.broadcast_object_list([data], src=0)[0]`,
        # but broadcast_object_list fills the list in place and returns None; this is the working form.)
        holder = [data]
        dist.broadcast_object_list(holder, src=0)
        data = holder[0]

        # Each GPU processes different batch
        local_batch = data[self.rank :: self.world_size]

        # Training loop
        for batch in local_batch:
            loss = self.model(batch)
            loss.backward()  # DDP syncs gradients automatically
            self.optimizer.step()
            self.optimizer.zero_grad()

        # Every rank reports a fingerprint of its weights so the test can check DDP kept them equal.
        weights = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        fingerprints = [None] * self.world_size
        dist.all_gather_object(fingerprints, weights.tolist())

        # Only rank 0 saves checkpoint
        if self.rank == 0:
            torch.save(self.model.state_dict(), "checkpoint.pt")
            return {"checkpoint": "checkpoint.pt", "fingerprints": fingerprints}

        return {}


def test_pattern_ddp_training_with_broadcast(tmp_path: Path) -> None:
    """Rank 0 loads and broadcasts data, DDP trains on shards, weights stay equal, rank 0 saves."""
    torch.manual_seed(1)
    data = [torch.randn(8, 5) for _ in range(6)]
    data_path = tmp_path / "data.pt"
    torch.save(data, data_path)

    runner = DistributedRunner(DDPWorker, world_size=2, cwd=tmp_path)
    runner.start_sync()
    try:
        out = runner.invoke_sync({"data_path": str(data_path)})
    finally:
        runner.stop_sync()
    assert out["checkpoint"] == "checkpoint.pt"
    saved = torch.load(tmp_path / "checkpoint.pt")
    assert set(saved) == {"module.linear.weight", "module.linear.bias"}
    rank0, rank1 = out["fingerprints"]
    assert rank0 == rank1, "DDP must keep the replicas identical"
    initial = torch.cat([p.detach().flatten() for p in MyModel().parameters()]).tolist()
    assert rank0 != initial, "training must have changed the weights"
    assert torch.allclose(
        torch.tensor(rank0), torch.cat([saved["module.linear.weight"].flatten(), saved["module.linear.bias"]])
    )


# --- Pattern 3: streaming with progress updates ----------------------------------------------------
class StreamingWorker(DistributedWorker):
    def setup(self, **kwargs):  # type: ignore[no-untyped-def]
        self.model = TinyGenerator(self.rank)

    def __call__(self, prompt: str, steps: int = 50, streaming: bool = False):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        for step in range(steps):
            result = self.model.step(prompt)

            # Stream progress every 5 steps
            if streaming and self.rank == 0 and step % 5 == 0:
                self.add_streaming_result(
                    {
                        "step": step,
                        "progress": step / steps,
                    },
                    as_text_event=True,
                )

            # Sync all workers
            dist.barrier()

        # Return final result
        if self.rank == 0:
            return {"output": result}
        return {}


def test_pattern_streaming_progress_as_text_events() -> None:
    """Progress every 5 steps arrives as SSE bytes, in order, then the final result."""

    async def main() -> list[bytes]:
        runner = DistributedRunner(worker_cls=StreamingWorker, world_size=2)
        await runner.start()
        try:
            return [e async for e in runner.stream({"prompt": "hi", "steps": 20}, as_text_events=True)]
        finally:
            await runner.stop()

    events = asyncio.run(main())
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    decoded = [json.loads(e[len(b"data: ") :]) for e in events]
    assert decoded[:-1] == [{"step": s, "progress": s / 20} for s in range(0, 20, 5)]
    # The final result holds a tensor: it arrives as fal's media object (torch.save bytes in a data URL).
    output = decoded[-1]["output"]
    assert (output["content_type"], output["shape"], output["dtype"]) == ("application/tensor", [1], "torch.float32")
    data = base64.b64decode(output["url"].removeprefix("data:application/tensor;base64,"))
    assert torch.load(io.BytesIO(data)).tolist() == [2.0]


def test_pattern_streaming_progress_as_objects() -> None:
    """The same worker streamed without text events yields Python objects (tensors stay tensors)."""
    with DistributedRunner(StreamingWorker, world_size=2) as runner:
        items = list(runner.stream_sync({"prompt": "abc", "steps": 10}))
    assert items[:-1] == [{"step": 0, "progress": 0.0}, {"step": 5, "progress": 0.5}]
    assert torch.equal(items[-1]["output"], torch.tensor([3.0]))
