"""The ``python -m lightdist.bench`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from lightdist.bench.pool import run_pool
from lightdist.bench.recovery import run_recovery

# --- command line ----------------------------------------------------------------------------------


def _world_sizes(text: str) -> list[int]:
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints like 1,2,4, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    if not float(text) >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return float(text)


def _run_lightning(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.lightning import run_lightning  # imports Lightning: only for this subcommand

    return run_lightning(args)


def _run_fabric(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.fabric import run_fabric  # imports Lightning: only for this subcommand

    return run_fabric(args)


def _run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.gpu import run_gpu  # the GPU proof kit: only for this subcommand

    return run_gpu(args)


def _run_recipes(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.recipes import run_recipes  # drives the lightdist CLI: only for this subcommand

    return run_recipes(args)


def _run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.recipes import run_sweep

    return run_sweep(args)


def _run_multihost(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.multihost import run_multihost

    return run_multihost(args)


def _run_payload(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.payload import run_payload

    return run_payload(args)


def _run_models(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.models import run_models  # imports Lightning: only for this subcommand

    return run_models(args)


def _run_optimizer_state(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.optimizer_state import run_optimizer_state  # imports Lightning: only for this subcommand

    return run_optimizer_state(args)


def _run_server(args: argparse.Namespace) -> dict[str, Any]:
    # Each starts its own lightdist serve: imported only for this subcommand.
    if args.clients:
        from lightdist.bench.server_load import run_server_load

        return run_server_load(args)
    from lightdist.bench.server import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    description = "lightdist benchmarks: each number next to a baseline measured in the same run"
    parser = argparse.ArgumentParser(prog="python -m lightdist.bench", description=description)
    common = argparse.ArgumentParser(add_help=False)  # options every subcommand takes
    common.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    commands = parser.add_subparsers(dest="command", required=True)
    pool = commands.add_parser("pool", parents=[common], help="pool start/stop, invoke round trip, stream throughput")
    pool.add_argument("--repeats", type=_positive, default=3, help="pools started per world size, and streams run")
    pool.add_argument("--items", type=_positive, default=20_000, help="items per stream")
    pool.add_argument("--calls", type=_positive, default=2_000, help="measured invoke calls (after 200 warm-up)")
    pool.add_argument("--world-sizes", type=_world_sizes, default=[1, 2, 4], help="e.g. 1,2,4")
    pool.set_defaults(func=run_pool)
    recovery = commands.add_parser("recovery", parents=[common], help="failure detection and recovery times")
    recovery.add_argument("--repeats", type=_positive, default=5, help="times each failure is measured")
    recovery.add_argument("--grace", type=_seconds, default=2.0, help="the pool's grace_period (its default: 2.0)")
    recovery.set_defaults(func=run_recovery)
    lightning = commands.add_parser(
        "lightning", parents=[common], help="Trainer fits on the warm pool vs ddp_spawn and a warm ddp group"
    )
    lightning.add_argument("--fits", type=_positive, default=5, help="fits per contender (the first is cold)")
    lightning.add_argument("--steps", type=_positive, default=20, help="training steps per fit")
    lightning.add_argument(
        "--throughput-steps", type=_positive, default=300, help="steps of the throughput fit (timed after the first 10)"
    )
    lightning.add_argument(
        "--throughput-repeats", type=_positive, default=5, help="throughput fits per contender (median)"
    )
    lightning.set_defaults(func=_run_lightning)
    fabric = commands.add_parser("fabric", parents=[common], help="Fabric launches on the warm pool vs ddp_spawn")
    fabric.add_argument("--launches", type=_positive, default=5, help="launches per contender (the first is cold)")
    fabric.add_argument("--steps", type=_positive, default=20, help="training steps per launch")
    fabric.set_defaults(func=_run_fabric)
    gpu = commands.add_parser("gpu", help="the GPU proof kit: every CUDA/NCCL path in one budgeted run (docs/gpu.md)")
    gpu.add_argument("--out", default="gpu-results.md", help="the markdown result; the JSON goes next to it")
    gpu.add_argument("--budget", type=_seconds, default=480.0, help="seconds for all parts together")
    gpu.add_argument("--parts", default="", help="run only these parts, e.g. c,f (the others: 'not selected')")
    gpu.add_argument("--dry-run", action="store_true", help="only check that every part would import, even with GPUs")
    gpu.add_argument("--rehearse-on-cpu", action="store_true", help="run every part on CPU ranks: checks the kit")
    gpu.set_defaults(func=_run_gpu, json=None)
    recipes = commands.add_parser(
        "recipes", parents=[common], help="every shipped CPU config: metric, wall time, peak memory"
    )
    recipes.add_argument("--only", default="", help="run only the jobs whose name starts with this")
    recipes.set_defaults(func=_run_recipes)
    sweep = commands.add_parser(
        "sweep", parents=[common], help="a 4-fit lightdist sweep vs the same fits as separate ddp_spawn commands"
    )
    sweep.add_argument("--repeats", type=_positive, default=2, help="runs per contender (best is reported)")
    sweep.add_argument("--epochs", type=_positive, default=3, help="max_epochs of each fit")
    sweep.set_defaults(func=_run_sweep)
    multihost = commands.add_parser(
        "multihost", parents=[common], help="a pool across 2 hosts (local agents): attach, invoke, host loss"
    )
    multihost.add_argument("--repeats", type=_positive, default=3, help="rounds (median is reported)")
    multihost.add_argument("--calls", type=_positive, default=500, help="timed invoke calls per round")
    multihost.set_defaults(func=_run_multihost)
    models = commands.add_parser(
        "models", parents=[common], help="large-model fits: pool vs one process, ddp_spawn, warm ddp; time and peak PSS"
    )
    models.add_argument("--sizes", default="50M,200M", help="parameter counts, e.g. 50M,200M or 2M")
    models.add_argument("--fits", type=_positive, default=3, help="timed fits per contender (after one warm-up)")
    models.add_argument("--steps", type=_positive, default=2, help="max_steps of each fit")
    models.add_argument(
        "--variants", default="full,frozen", help="full (all trainable), frozen (all but the last layer)"
    )
    models.add_argument("--contenders", default="single,ddp,ddp_spawn,pool-new,pool-same", help="a subset to run")
    models.add_argument(
        "--timeout", type=_seconds, default=900.0, help="seconds per contender before its tree is killed"
    )
    models.add_argument("--lora", action="store_true", help="also time the LoRA recipe's CPU config, pool vs ddp_spawn")
    models.add_argument(
        "--lora-base",
        default="tiny",
        help="with --lora: tiny (the recipe's) or WIDTHxLAYERS of a larger random Llama, e.g. 2048x16",
    )
    models.set_defaults(func=_run_models)
    optstate = commands.add_parser(
        "optimizer-state",
        parents=[common],
        help="Adam fits on the pool: the optimizer state kept on rank 0 vs freed, and a driver save_checkpoint",
    )
    optstate.add_argument("--size", default="50M", help="parameter count, e.g. 50M")
    optstate.add_argument("--fits", type=_positive, default=3, help="timed fits per contender (after one warm-up)")
    optstate.add_argument("--steps", type=_positive, default=2, help="max_steps of each fit")
    optstate.add_argument("--contenders", default="pool-kept,pool-freed,pool-save,single", help="a subset to run")
    optstate.add_argument("--timeout", type=_seconds, default=900.0, help="seconds per contender")
    optstate.set_defaults(func=_run_optimizer_state)
    payload = commands.add_parser(
        "payload", parents=[common], help="a runner call with a large tensor there and back: shm, frames, in-band"
    )
    payload.add_argument("--mb", type=_positive, default=500, help="tensor size each way, in MB")
    payload.add_argument("--calls", type=_positive, default=3, help="timed calls per contender (median)")
    payload.set_defaults(func=_run_payload)
    server = commands.add_parser(
        "server",
        parents=[common],
        help="lightdist serve: attach, Enter to first step, four configs back to back; with --clients N: "
        "N event-stream clients on one job and a queue of jobs",
    )
    server.add_argument("--repeats", type=_positive, default=3, help="runs per contender (median is reported)")
    server.add_argument("--epochs", type=_positive, default=2, help="max_epochs of each digits fit")
    server.add_argument("--devices", type=_positive, default=2, help="ranks of the server and of every command")
    server.add_argument(
        "--clients", type=int, default=0, help="load instead: this many event-stream clients following one job"
    )
    server.add_argument("--queued", type=_positive, default=100, help="with --clients: jobs submitted behind it")
    server.add_argument(
        "--steps", type=_positive, default=2000, help="with --clients: training steps of the followed job"
    )
    server.add_argument(
        "--step-sleep", type=_seconds, default=0.02, help="with --clients: seconds per step (the event rate)"
    )
    server.set_defaults(func=_run_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raw: dict[str, Any] = args.func(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1, default=str)
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
