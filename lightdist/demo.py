"""python -m lightdist.demo [--world-size 2] [--epochs 20]

A warm pool in one screen: start 2 ranks once, train a small DDP model on them while the loss
streams back, then run more calls on the same, already-warm processes. CPU/gloo here; the same code
runs on GPUs (NCCL, one GPU per rank). The data is made by the demo: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from lightdist import DistributedRunner, DistributedWorker


class RegressionWorker(DistributedWorker):
    """Each rank holds a DDP replica of a small MLP and its shard of a synthetic regression set."""

    def setup(self, samples: int = 4096, seed: int = 0) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        gen = torch.Generator().manual_seed(seed)  # same data and initial weights on every rank
        x = torch.randn(samples, 8, generator=gen)
        true_w = torch.randn(8, 1, generator=gen)
        y = torch.sin(x @ true_w) + 0.05 * torch.randn(samples, 1, generator=gen)
        self.x, self.y = (
            x[self.rank :: self.world_size].to(self.device),
            y[self.rank :: self.world_size].to(self.device),
        )
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(self.device)
        self.model = DDP(model)

    def __call__(
        self, streaming: bool = False, epochs: int = 20, lr: float = 0.05, batch: int = 128
    ) -> dict[str, float]:
        opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        step = 0
        loss = torch.zeros(())
        for epoch in range(epochs):
            for i in range(0, len(self.x), batch):
                loss = torch.nn.functional.mse_loss(self.model(self.x[i : i + batch]), self.y[i : i + batch])
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                step += 1
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if streaming and self.rank == 0:
                self.add_streaming_result({"epoch": epoch, "step": step, "loss": mean.item() / self.world_size})
            if self.cancelled:
                break
        return {"steps": step, "loss": mean.item() / self.world_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2] if __doc__ else None)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with DistributedRunner(RegressionWorker, world_size=args.world_size) as runner:
        print(f"pool of {args.world_size} ranks ready in {time.perf_counter() - started:.2f} s (pids {runner.pids})")

        t = time.perf_counter()
        for event in runner.stream_sync({"epochs": args.epochs}):
            if "epoch" in event:
                print(f"  epoch {event['epoch']:3d}  step {event['step']:4d}  loss {event['loss']:.4f}")
            else:
                final = event
        print(f"trained {final['steps']} steps to loss {final['loss']:.4f} in {time.perf_counter() - t:.2f} s")

        t = time.perf_counter()
        for _ in range(5):
            runner.invoke_sync({"epochs": 1})
        print(f"5 more one-epoch fits on the warm pool: {(time.perf_counter() - t) / 5 * 1000:.1f} ms each")
    print(f"pool stopped; total {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
