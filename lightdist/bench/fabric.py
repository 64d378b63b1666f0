"""``fabric``: ``fabric.launch(fn)`` on the warm pool next to Fabric's own ``ddp_spawn``.

Run: ``python -m lightdist.bench fabric [--launches 5] [--steps 20]``.

Each launch is a new ``Fabric`` (2 CPU ranks, gloo) running the same function: a tiny MLP trained for
``--steps`` steps on data made inside the function. The contenders alternate, in swapped order every
other round, so load from other jobs hits them alike. The first pool launch starts the pool.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric import Fabric

from lightdist.bench.common import Row, format_table, machine, verdict

WORLD_SIZE = 2
BATCH = 32
FEATURES = 32


def train(fabric: Fabric, steps: int) -> float:
    """The launched function: ``steps`` DDP steps of a tiny MLP; rank 0's last loss comes back."""
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01))
    x = torch.randn(steps * BATCH, FEATURES, generator=torch.Generator().manual_seed(fabric.global_rank))
    loss = torch.zeros(())
    for batch in torch.split(x, BATCH):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(batch), batch.sum(1, keepdim=True))
        fabric.backward(loss)
        optimizer.step()
    return float(loss.detach())


def timed_launch(strategy: str, steps: int) -> float:
    if strategy == "ddp_spawn":
        os.environ.pop("MASTER_PORT", None)  # ddp_spawn leaves its port here: pick a fresh free one each launch
    t0 = time.perf_counter()
    Fabric(strategy=strategy, accelerator="cpu", devices=WORLD_SIZE).launch(functools.partial(train, steps=steps))
    return time.perf_counter() - t0


def measure_fabric(launches: int, steps: int) -> dict[str, Any]:
    import lightdist.lightning  # noqa: F401 - registers strategy="lightdist"
    from lightdist.lightning import strategy as strategy_module

    out: dict[str, Any] = {"pool_s": [], "spawn_s": []}
    try:
        for i in range(launches):
            runs = [("pool_s", "lightdist"), ("spawn_s", "ddp_spawn")]
            for key, strategy in runs if i % 2 == 0 else runs[::-1]:
                out[key].append(timed_launch(strategy, steps))
    finally:
        for runner in list(strategy_module._pools.values()):
            runner.stop_sync()
        strategy_module._pools.clear()
    return out


def fabric_rows(data: dict[str, Any]) -> list[Row]:
    pool, spawn = (statistics.median(data[k][1:] or data[k]) for k in ("pool_s", "spawn_s"))
    n = len(data["pool_s"])
    warm = f"median of launches 2-{n}" if n > 2 else "launch 2" if n == 2 else "launch 1"
    return [
        Row(
            "pool launch 1, includes pool start (s)",
            f"{data['pool_s'][0]:.3f}",
            f"{data['spawn_s'][0]:.3f} (ddp_spawn)",
            f"{data['pool_s'][0] / data['spawn_s'][0]:.2f}x",
        ),
        Row(
            f"ddp_spawn launch, {warm} (s)",
            f"{spawn:.3f}",
            f"{pool:.3f} (pool)",
            f"{spawn / pool:.1f}x",
            ">= 20x",
            verdict(spawn / pool >= 20),
        ),
    ]


def run_fabric(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(
        f"lightdist.bench fabric: {info['date']}, Python {info['python']}, torch {info['torch']}, "
        f"lightning {L.__version__}, {info['cpus']} CPUs, load {info['loadavg']}",
        flush=True,
    )
    data = measure_fabric(args.launches, args.steps)
    print(format_table(fabric_rows(data)))
    for key in ("pool_s", "spawn_s"):
        print(f"  {key}: {', '.join(f'{v:.3f}' for v in data[key])}")
    return {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, **data}
