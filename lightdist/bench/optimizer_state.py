"""``optimizer-state``: a fit's optimizer state on the pool, unread and saved from the driver.

Run: ``python -m lightdist.bench optimizer-state [--size 50M] [--fits 3] [--steps 2]``.

After a fit, rank 0 keeps the fit's optimizers for the driver to fetch when ``trainer.optimizers``
or ``trainer.save_checkpoint`` first needs them (``lightdist/lightning/_optimizer_state.py``). The
models benchmark's stack of ``Linear(d, d)`` layers, all trainable, is trained here with Adam (its
state is twice the parameters), the same model continuing with a new Trainer per fit. Each
contender runs in a child process of its own (one warm-up fit, then ``--fits`` timed ones), whose
process tree's peak PSS is sampled as in ``models``; the child also reads its tree's PSS once the
fits are over and the pool idles.

* ``pool-kept``: ``strategy="lightdist"`` as it is by default; nobody reads the optimizers.
* ``pool-freed``: ``PoolStrategy(keep_optimizer_state=False)``: the ranks free the state when the
  fit ends, as every fit did before the driver could fetch it. The baseline of the two above.
* ``pool-save``: as ``pool-kept``, then ``trainer.save_checkpoint(path)`` in the driver after each
  fit, timed apart: the first read of ``trainer.optimizers`` (the fetch), then the save.
* ``single``: ``strategy="auto", devices=1`` with ``save_checkpoint`` after each fit: what the
  same checkpoint costs in-process (the baseline of the driver's save).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightdist.bench.common import Row, format_table, machine, process_tree, sigterm_exits
from lightdist.bench.models import LinearStack, RandomRows, TreeSampler, bench_trainer, compare, parse_size, shape
from lightdist.bench.recipes import _pss_kib

MARK = "LIGHTDIST_BENCH_OPTSTATE "
CONTENDERS = {
    "pool-kept": "pool, optimizer state kept on rank 0 (default)",
    "pool-freed": "pool, keep_optimizer_state=False",
    "pool-save": "pool, + trainer.save_checkpoint in the driver",
    "single": "single process (devices=1), + save_checkpoint",
}
IDLE_SETTLE_S = 1.0  # ranks collect after a call that grew them; let that finish before reading PSS


class AdamStack(LinearStack):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def _trainer(name: str, steps: int) -> L.Trainer:
    from lightdist.lightning import PoolStrategy

    strategy: Any = {"single": "auto", "pool-freed": PoolStrategy(keep_optimizer_state=False)}.get(name, "lightdist")
    return bench_trainer(strategy, steps)


def _tree_pss_gb() -> float:
    return sum(_pss_kib(pid) for pid in process_tree(os.getpid())) / 2**20


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightdist.bench.optimizer_state")
    parser.add_argument("--child", choices=list(CONTENDERS), required=True)
    for option in ("--width", "--layers", "--steps", "--fits"):
        parser.add_argument(option, type=int, required=True)
    args = parser.parse_args(argv)
    model, data = AdamStack(args.width, args.layers, frozen=False), RandomRows(args.width, args.steps)
    out: dict[str, list[float]] = {"fit_s": [], "fetch_s": [], "save_s": []}
    with tempfile.TemporaryDirectory(prefix="lightdist-bench-optstate-") as scratch:
        for fit in range(1 + args.fits):  # the first is the warm-up (pool start, first-call costs)
            started = time.perf_counter()
            trainer = _trainer(args.child, args.steps)  # a new Trainer, the same model continuing
            trainer.fit(model, datamodule=data)
            fitted = time.perf_counter()
            if args.child in ("pool-save", "single"):
                _ = trainer.optimizers  # the pool's fetch; nothing to fetch in-process
                fetched = time.perf_counter()
                trainer.save_checkpoint(Path(scratch) / "last.ckpt")
                saved = time.perf_counter()
                if fit:
                    out["fetch_s"].append(fetched - fitted)
                    out["save_s"].append(saved - fitted)
            if fit:
                out["fit_s"].append(fitted - started)
        del trainer
        gc.collect()
        time.sleep(IDLE_SETTLE_S)
        print(MARK + json.dumps({**out, "idle_gb": _tree_pss_gb()}), flush=True)


def run_child(name: str, width: int, layers: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "lightdist.bench.optimizer_state", "--child", name]
    command += ["--width", str(width), "--layers", str(layers), "--steps", str(args.steps), "--fits", str(args.fits)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: no pipe to keep drained
        proc = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True)
        sampler, error = TreeSampler(proc.pid), None
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            error = f"timeout ({args.timeout:.0f} s)"
        finally:
            sampler.stop_and_kill()
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [line[len(MARK) :] for line in stdout.splitlines() if line.startswith(MARK)]
    if error is None and (proc.returncode != 0 or not lines):
        error = f"failed, exit {proc.returncode}"
    if error is not None:
        print(f"  {name}: {error}; its stderr ends:\n{stderr[-3000:]}", flush=True)
        return {"error": error, "peak_gb": sampler.peak_kib / 2**20}
    return {**json.loads(lines[-1]), "peak_gb": sampler.peak_kib / 2**20}


# (contender, figure, what it is; baseline contender, its figure, its name; target ratio)
ROWS: list[tuple[str, str, str, str | None, str, str, float | None]] = [
    ("pool-freed", "fit_s", "fit, median (s)", None, "", "", None),
    ("pool-kept", "fit_s", "fit, median (s)", "pool-freed", "fit_s", "not kept", 1.05),
    ("pool-freed", "peak_gb", "peak PSS (GB)", None, "", "", None),
    ("pool-kept", "peak_gb", "peak PSS (GB)", "pool-freed", "peak_gb", "not kept", 1.05),
    ("pool-kept", "idle_gb", "PSS of the idle pool after the fits (GB)", "pool-freed", "idle_gb", "not kept", None),
    ("single", "save_s", "save_checkpoint, median (s)", None, "", "", None),
    (
        "pool-save",
        "fetch_s",
        "first read of trainer.optimizers (the fetch), median (s)",
        "single",
        "save_s",
        "in-process save",
        None,
    ),
    ("pool-save", "save_s", "save_checkpoint incl. the fetch, median (s)", "single", "save_s", "in-process save", None),
    ("pool-save", "peak_gb", "peak PSS (GB)", "pool-kept", "peak_gb", "no save", None),
    ("pool-save", "idle_gb", "PSS of the idle pool after the fits (GB)", "pool-kept", "idle_gb", "no save", None),
]


def _figure(result: dict[str, Any], key: str) -> float | str:
    if result.get("error"):
        return str(result["error"])
    value = result[key]
    return float(statistics.median(value) if isinstance(value, list) else value)


def rows(label: str, fits: int, results: dict[str, dict[str, Any]]) -> list[Row]:
    out = []
    for name, key, what, base_name, base_key, base_label, limit in ROWS:
        what = what.replace("median", f"median of {fits}")
        if name not in results:
            continue
        base = results.get(base_name) if base_name else None
        value = _figure(results[name], key)
        out.append(
            compare(
                f"{label}: {CONTENDERS[name]}, {what}",
                value,
                _figure(base, base_key) if base else None,
                base_label,
                limit,
            )
        )
    return out


def _contenders(text: str) -> list[str]:
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    if not chosen or chosen - set(CONTENDERS):
        raise SystemExit(f"--contenders: choose from {','.join(CONTENDERS)}, got {text!r}")
    return [name for name in CONTENDERS if name in chosen]


def run_optimizer_state(args: argparse.Namespace) -> dict[str, Any]:
    params = parse_size(args.size)
    _contenders(args.contenders)  # bad input fails before anything runs
    width, layers = shape(params)
    with sigterm_exits():  # the finally blocks kill the child trees
        info = machine()
        print(
            f"lightdist.bench optimizer-state: {info['date']}, torch {info['torch']}, lightning {L.__version__}, "
            f"{info['cpus']} CPUs, load {info['loadavg']}; {layers} x Linear({width}, {width}) = "
            f"{layers * width * width / 1e6:.1f}M parameters, Adam",
            flush=True,
        )
        results = {}
        for name in _contenders(args.contenders):
            results[name] = run_child(name, width, layers, args)
            print(f"  {name}: {results[name]}", flush=True)
        print(format_table(rows(f"{args.size} Adam", args.fits, results)))
        return {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, "results": results}


if __name__ == "__main__":
    # Through the package's name, so that pickles (the pool) name this module, not __main__.
    from lightdist.bench.optimizer_state import child_main as _child_main

    _child_main(sys.argv[1:])
