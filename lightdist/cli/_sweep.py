"""``lightdist sweep``: every combination of ``--grid`` overrides, one after another, on one pool.

::

    lightdist sweep --config digits/pretrain-cpu \\
        --grid model.lr=1e-3,3e-3 --grid data.batch_size=16,32 --trainer.max_epochs=5

Each combination is a full LightningCLI parse of the config plus its overrides (so a bad key fails as
``lightdist fit`` would), fitted on the same warm pool: the ranks start once for the whole sweep.
Every combination gets its own TensorBoard run, ``<sweep_dir>/<combination>/``, side by side under
one ``--logdir``, and its own checkpoint directory; the final metrics of all of them are printed as
a table, written to ``<sweep_dir>/results.jsonl`` and recorded for TensorBoard's HParams tab (each
combination's values with its final metrics, see :mod:`lightdist.cli._hparams`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Combination", "main", "parse_grid", "split_values"]


@dataclass
class Combination:
    """One point of the grid and what its fit produced."""

    overrides: dict[str, str]
    label: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    rank_pids: list[int] = field(default_factory=list)
    started: float = 0.0  # wall clock (time.time()) when its fit started
    step: int = 0  # the trainer's global_step after the fit


def split_values(text: str) -> list[str]:
    """Split ``1e-3,[1,2],x`` at the commas outside brackets and quotes: ``["1e-3", "[1,2]", "x"]``."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    return [value.strip() for value in values]


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["model.lr=1e-3,1e-4"]`` → ``[("model.lr", ["1e-3", "1e-4"])]``; raises ValueError on bad specs."""
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. --grid model.lr=1e-3,1e-4)")
        if any(key == seen for seen, _ in grid):
            raise ValueError(f"--grid {key}: given twice; put all its values in one --grid")
        parsed = split_values(values)
        if any(not value for value in parsed):
            raise ValueError(f"--grid {spec!r}: an empty value (check for a trailing comma)")
        grid.append((key, parsed))
    return grid


def _label(overrides: dict[str, str]) -> str:
    # short keys when they are unambiguous: "lr=0.001,batch_size=32" reads better in TensorBoard
    short = [key.rsplit(".", 1)[-1] for key in overrides]
    names = short if len(set(short)) == len(short) else list(overrides)
    text = ",".join(f"{name}={value}" for name, value in zip(names, overrides.values()))
    return "".join(char if char.isalnum() or char in "=,.-_+" else "_" for char in text)


def combinations(grid: list[tuple[str, list[str]]]) -> list[Combination]:
    keys = [key for key, _ in grid]
    out = []
    for values in itertools.product(*(values for _, values in grid)):
        overrides = dict(zip(keys, values))
        out.append(Combination(overrides, _label(overrides)))
    return out


def _fit(combo: Combination, args: list[str], sweep_dir: Path) -> bool:
    """Fit one combination; returns False when the user interrupted it."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightdist.cli._lightning import LightdistCLI

    combo.started = time.time()  # also for TensorBoard when this combination fails
    overrides = [f"--{key}={value}" for key, value in combo.overrides.items()]
    cli = LightdistCLI([*args, *overrides], run=False, quiet=True)
    trainer = cli.trainer
    # one TensorBoard run and one checkpoint directory per combination, side by side
    trainer.logger = TensorBoardLogger(save_dir=sweep_dir, name="", version=combo.label, default_hp_metric=False)
    for callback in trainer.checkpoint_callbacks:
        callback.dirpath = str(sweep_dir / combo.label / "checkpoints")  # type: ignore[attr-defined]
    started = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    combo.seconds = time.perf_counter() - started
    combo.step = trainer.global_step
    combo.metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    pool = getattr(trainer.strategy, "pool", None)  # PoolStrategy; another strategy has no pool
    combo.rank_pids = sorted(pool().pids.values()) if callable(pool) else []
    return not trainer.interrupted


def _table(grid_keys: list[str], combos: list[Combination]) -> str:
    metric_names = sorted({name for combo in combos for name in combo.metrics})
    header = [*grid_keys, *metric_names, "seconds"]
    rows = []
    for combo in combos:
        cells = [combo.overrides[key] for key in grid_keys]
        if combo.error is not None:
            cells += [f"failed: {combo.error}"[:60]] + [""] * (len(metric_names) - 1 if metric_names else 0)
        else:
            cells += [f"{combo.metrics[name]:.4g}" if name in combo.metrics else "" for name in metric_names]
        cells.append(f"{combo.seconds:.1f}")
        rows.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from lightdist.cli._catalog import resolve_config_args
    from lightdist.cli._errors import BAD_INPUT, INTERRUPTED, RANK_FAILED, classify

    parser = argparse.ArgumentParser(
        prog="lightdist sweep",
        description="Fit every combination of --grid overrides on one warm pool. Other arguments "
        "(--config, --trainer.max_epochs=3, ...) are passed to each fit as to 'lightdist fit'.",
    )
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="values to sweep")
    parser.add_argument("--sweep_dir", default=None, help="where runs go (default: runs/sweeps/<config>-<time>)")
    known, rest = parser.parse_known_args(argv)
    try:
        grid = parse_grid(known.grid)
    except ValueError as error:
        print(f"lightdist sweep: error: {error}", file=sys.stderr)
        return 2
    if not grid:
        print("lightdist sweep: error: give at least one --grid KEY=V1,V2,...", file=sys.stderr)
        return 2
    args = resolve_config_args(rest)
    sweep_dir = Path(known.sweep_dir or _default_dir(args))
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        print(
            f"lightdist sweep: error: --sweep_dir {str(sweep_dir)!r} already holds runs; choose another "
            "directory or remove it",
            file=sys.stderr,
        )
        return 2
    combos = combinations(grid)
    print(f"lightdist sweep: {len(combos)} combinations on one pool; TensorBoard runs in {sweep_dir}", flush=True)
    print(f"  watch them with: lightdist tensorboard --logdir {sweep_dir}", flush=True)
    status = 0
    for index, combo in enumerate(combos, 1):
        try:
            finished = _fit(combo, args, sweep_dir)
        except Exception as error:  # noqa: BLE001 - classified in one place; a bug is re-raised
            outcome = classify(error)
            if outcome is None:
                raise
            code, line = outcome
            if code == BAD_INPUT:
                # the same config is behind every combination: one bad key fails them all
                print(f"lightdist sweep: error: {combo.label}: {line}", file=sys.stderr)
                return code
            combo.error, status = line, RANK_FAILED
            print(f"[{index}/{len(combos)}] {combo.label}: failed: {combo.error}", file=sys.stderr, flush=True)
            _record(sweep_dir, combo, grid, "failure")
            continue
        _record(sweep_dir, combo, grid, "success" if finished else "unknown")
        if index == 1:
            # Lightning's "GPU available: ..." notes were shown once; not again for every combination
            logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(combo.metrics.items()))
        print(f"[{index}/{len(combos)}] {combo.label}: {shown} ({combo.seconds:.1f} s)", flush=True)
        if not finished:
            print("lightdist sweep: interrupted; the remaining combinations were not run", file=sys.stderr)
            combos, status = combos[:index], INTERRUPTED
            break
    _write_results(sweep_dir, combos)
    _record_experiment(sweep_dir, grid, combos)
    print("\n" + _table([key for key, _ in grid], combos), flush=True)
    print(f"\nresults: {sweep_dir / 'results.jsonl'}", flush=True)
    return status


def _default_dir(args: list[str]) -> str:
    config = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--config"), None)
    config = config or next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), "sweep")
    return str(Path("runs") / "sweeps" / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _record(sweep_dir: Path, combo: Combination, grid: list[tuple[str, list[str]]], status: str) -> None:
    """The combination's values, final metrics and status, for TensorBoard's HParams tab."""
    from lightdist.cli._hparams import typed_values, write_session

    values = {key: typed_values(options)[options.index(combo.overrides[key])] for key, options in grid}
    try:
        write_session(
            sweep_dir / combo.label, values, combo.metrics, step=combo.step, started=combo.started, status=status
        )
    except OSError as error:  # the fits and results.jsonl matter more than the HParams tab
        print(f"lightdist sweep: warning: {combo.label}: HParams not written: {error}", file=sys.stderr)


def _record_experiment(sweep_dir: Path, grid: list[tuple[str, list[str]]], combos: list[Combination]) -> None:
    """The HParams table's columns, once the sweep is over: every grid key and every final metric."""
    from lightdist.cli._hparams import typed_values, write_experiment

    columns = {key: list(dict.fromkeys(typed_values(options))) for key, options in grid}
    metric_names = sorted({name for combo in combos for name in combo.metrics})
    try:
        write_experiment(sweep_dir, columns, metric_names)
    except OSError as error:
        print(f"lightdist sweep: warning: HParams table not written: {error}", file=sys.stderr)


def _write_results(sweep_dir: Path, combos: list[Combination]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [
        {
            "run": c.label,
            "overrides": c.overrides,
            "metrics": c.metrics,
            "seconds": round(c.seconds, 3),
            "error": c.error,
            "rank_pids": c.rank_pids,
        }
        for c in combos
    ]
    tmp = sweep_dir / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(sweep_dir / "results.jsonl")
