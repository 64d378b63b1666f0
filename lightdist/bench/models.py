"""``models``: fits of large models on the pool next to one process, ``ddp_spawn`` and warm native DDP.

Run: ``python -m lightdist.bench models [--sizes 50M,200M] [--fits 3] [--steps 2] [--variants full,frozen]``.

The model is a stack of bias-free ``Linear(d, d)`` layers sized to ``--sizes`` parameters, trained
for ``--steps`` steps on a few random rows made in ``train_dataloader``; the ``frozen`` variant
freezes every layer but the last (an adapter-style fine-tune). So the fit's work is small and what
it costs to move, copy and hold the weights shows.

Every contender runs in a child process of its own (``--child NAME``: one untimed warm-up fit, then
``--fits`` timed fits, one JSON result line), so that the peak PSS measured over the child's process
tree — sampled by a thread here every 50 ms, summed over the child and all its descendants — is that
contender's alone. Native DDP is the same child under ``torch.distributed.run`` (its group stays up
between fits: the warm baseline the pool is compared with). A child that dies, fails or runs past
``--timeout`` becomes a row saying so; its whole tree is killed and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightdist.bench.common import Row, format_table, free_port, machine, process_tree, sigterm_exits, verdict
from lightdist.bench.recipes import _pss_kib, measure

WORLD_SIZE = 2
BATCH = 8
MAX_WIDTH = 2048  # 12 layers ~ 50M parameters, 48 ~ 200M
MARK = "LIGHTDIST_BENCH_MODELS "  # prefix of a child's result line (ranks share its stdout)
SAMPLE_S = 0.05  # RSS sampling interval; see TreeSampler._run for when PSS is read
TREE_EVERY = 10  # samples between walks of /proc for the child's descendants
PSS_GROWTH = 1.02
PSS_EVERY_S = 1.0
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CONTENDERS = {  # name: row label
    "single": "single process (devices=1), new model",
    "ddp": "native ddp, warm (torchrun), new model",
    "ddp_spawn": "ddp_spawn, new model",
    "pool-new": "pool, new model per fit",
    "pool-same": "pool, same model continuing",
}
FROZEN_CONTENDERS = ("ddp", "ddp_spawn", "pool-new", "pool-same")  # one process never shares weights
TIME_TARGETS = {"pool-new": 1.2, "pool-same": 1.05}  # x the warm native DDP fit
STRATEGIES = {
    "single": "auto",
    "ddp": "ddp",
    "ddp_spawn": "ddp_spawn",
    "pool-new": "lightdist",
    "pool-same": "lightdist",
}
ENV_DROPPED = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "PL_GLOBAL_SEED")


class LinearStack(L.LightningModule):
    def __init__(self, width: int, layers: int, frozen: bool) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
        if frozen:
            self.layers[:-1].requires_grad_(False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layers(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class RandomRows(L.LightningDataModule):
    """One epoch of ``steps`` batches per rank, made where the loader is built (nothing to ship)."""

    def __init__(self, width: int, steps: int) -> None:
        super().__init__()
        self.width, self.samples = width, steps * BATCH * WORLD_SIZE

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(self.samples, self.width, generator=g), torch.randn(self.samples, self.width, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def shape(params: int) -> tuple[int, int]:
    """(width, layers) with width * width * layers ~ params; narrower for small sizes so that even a
    smoke-test model has a few layers (and a frozen base)."""
    width = MAX_WIDTH
    while width > 64 and params < 4 * width * width:
        width //= 2
    return width, max(2, round(params / (width * width)))


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    text = text.strip().upper()
    try:
        return round(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise SystemExit(f"--sizes: expected parameter counts like 50M,200M or 2M, got {text!r}") from None


def _choice(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise SystemExit(f"{option}: choose from {','.join(allowed)}, got {text!r}")
    return [name for name in allowed if name in chosen]


# --- the child: one contender's fits --------------------------------------------------------------


def bench_trainer(strategy: Any, steps: int) -> L.Trainer:
    """A fit's Trainer: ``steps`` steps, no logger, checkpointing, progress bar or model summary."""
    return L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1 if strategy == "auto" else WORLD_SIZE,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _fit(strategy: str, model: LinearStack, data: RandomRows, steps: int) -> float:
    t0 = time.perf_counter()
    bench_trainer(strategy, steps).fit(model, datamodule=data)
    return time.perf_counter() - t0


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightdist.bench.models")
    parser.add_argument("--child", choices=list(CONTENDERS), required=True)
    for name in ("--width", "--layers", "--steps", "--fits"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--frozen", action="store_true")
    args = parser.parse_args(argv)
    strategy = STRATEGIES[args.child]
    if strategy == "lightdist":
        import lightdist.lightning  # noqa: F401 - registers strategy="lightdist"
    data = RandomRows(args.width, args.steps)
    model = LinearStack(args.width, args.layers, args.frozen)
    times = []
    for _ in range(1 + args.fits):  # the first fit is the warm-up (pool start, ddp group, first-call costs)
        if args.child != "pool-same":
            model = LinearStack(args.width, args.layers, args.frozen)  # built outside the timed fit
        if strategy == "ddp_spawn":  # it leaves its port here: a fresh free one per fit (torchrun's must stay)
            os.environ.pop("MASTER_PORT", None)
        times.append(_fit(strategy, model, data, args.steps))
    if os.environ.get("RANK", "0") == "0":
        print(MARK + json.dumps({"first_s": times[0], "seconds": times[1:]}), flush=True)


# --- the parent: children, their memory, their leftovers ------------------------------------------


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22, starttime: tells a reused pid apart


def _rss_kib(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    except (OSError, ValueError, IndexError):
        return 0


class TreeSampler:
    """Peak PSS of ``root`` and all its descendants, sampled every ``SAMPLE_S`` by a thread. It keeps
    every pid it has seen with its start time: the pool's template runs in its own session, so only
    this list finds what a dead child left behind."""

    def __init__(self, root: int) -> None:
        self.root, self.peak_kib, self.seen = root, 0, dict[int, str]()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-pss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Reading smaps_rollup costs ~10 ms of CPU per torch-loaded process here, and a walk of /proc
        # ~7 ms: every 50 ms for 4 processes that would take most of a core from the fits measured on
        # 2 cores. So the cheap RSS (statm) is summed every 50 ms, the tree is walked every 0.5 s, and
        # PSS (never above RSS, and rising only as RSS does) is read when RSS has grown by 2 % since
        # its lowest point after the last read, and at least every second.
        pids: list[int] = []
        low, last_read = 0, 0.0
        for i in itertools.count():
            if i % TREE_EVERY == 0:
                pids = process_tree(self.root)
                for pid in pids:
                    if pid not in self.seen and (started := _start_time(pid)) is not None:
                        self.seen[pid] = started
            rss = sum(_rss_kib(pid) for pid in pids)
            if rss > low * PSS_GROWTH or time.monotonic() - last_read >= PSS_EVERY_S:
                self.peak_kib = max(self.peak_kib, sum(_pss_kib(pid) for pid in pids))
                low, last_read = rss, time.monotonic()
            low = min(low, rss)
            if self._done.wait(SAMPLE_S):
                return

    def stop_and_kill(self) -> None:
        self._done.set()
        self._thread.join()
        for pid, started in self.seen.items():
            if _start_time(pid) == started:  # still the same process
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    first_s: float | None = None
    peak_gb: float = 0.0
    error: str | None = None
    stderr_tail: str = ""

    @property
    def median(self) -> float | str:
        return self.error or statistics.median(self.seconds)


def run_child(name: str, width: int, layers: int, frozen: bool, args: argparse.Namespace) -> Result:
    child = [
        "-m",
        "lightdist.bench.models",
        "--child",
        name,
        "--width",
        str(width),
        "--layers",
        str(layers),
        "--steps",
        str(args.steps),
        "--fits",
        str(args.fits),
        *(["--frozen"] if frozen else []),
    ]
    if name == "ddp":
        child = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={WORLD_SIZE}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *child,
        ]
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROPPED}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: no pipe to keep drained
        proc = subprocess.Popen([sys.executable, *child], stdout=out, stderr=err, env=env, start_new_session=True)
        sampler, result = TreeSampler(proc.pid), Result()
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            result.error = f"timeout ({args.timeout:.0f} s)"
        finally:
            sampler.stop_and_kill()
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result.peak_gb, result.stderr_tail = sampler.peak_kib / 2**20, stderr[-3000:]
    lines = [line[len(MARK) :] for line in stdout.splitlines() if line.startswith(MARK)]
    if result.error is None and proc.returncode == -signal.SIGKILL:
        result.error = "OOM (signal 9)"  # nothing else here sends it; the kernel's OOM killer does
    elif result.error is None and (proc.returncode != 0 or not lines):
        oom = "signal 9" in stderr or "SIGKILL" in stderr  # a rank was killed, the driver reported it
        result.error = f"{'OOM? a rank got signal 9, ' if oom else 'failed, '}exit {proc.returncode}"
    if result.error is None:
        data = json.loads(lines[-1])
        result.seconds, result.first_s = data["seconds"], data["first_s"]
    return result


# --- the table ------------------------------------------------------------------------------------


def compare(metric: str, value: float | str, base: float | str | None, base_name: str, limit: float | None) -> Row:
    """A row of ``value`` next to ``base``; a target ``value <= limit x base`` when ``limit`` is set."""
    if isinstance(value, str):  # the contender failed: a missed target, if it had one
        return Row(
            metric, value, "-", "-", "-" if limit is None else f"<= {limit:g}x", "info" if limit is None else "FAIL"
        )
    if base is None:
        return Row(metric, f"{value:.3f}")
    if isinstance(base, str):
        return Row(metric, f"{value:.3f}", f"{base} ({base_name})", "-", "-", "info" if limit is None else "n/a")
    ratio = value / base
    target, passed = ("-", "info") if limit is None else (f"<= {limit:g}x", verdict(ratio <= limit))
    return Row(metric, f"{value:.3f}", f"{base:.3f} ({base_name})", f"{ratio:.2f}x", target, passed)


def variant_rows(prefix: str, fits: int, results: dict[str, Result]) -> list[Row]:
    ddp, spawn = results.get("ddp"), results.get("ddp_spawn")
    rows = []
    for name, result in results.items():
        base = ddp if name in ("ddp_spawn", *TIME_TARGETS) else None
        rows.append(
            compare(
                f"{prefix}: {CONTENDERS[name]}, median of {fits} (s)",
                result.median,
                base.median if base else None,
                "warm ddp",
                TIME_TARGETS.get(name),
            )
        )
    for name, result in results.items():
        pool = name in TIME_TARGETS and spawn is not None
        rows.append(
            compare(
                f"{prefix}: {CONTENDERS[name]}, peak PSS (GB)",
                result.peak_gb,  # a dead spawn: n/a
                (spawn.error or spawn.peak_gb) if spawn and pool else None,
                "ddp_spawn",
                1.0 if pool else None,
            )
        )
    return rows


LORA_LIGHT = [
    "--data.init_args.batch_size=2",
    "--model.init_args.max_length=32",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
]


def parse_lora_base(text: str) -> tuple[int, int] | None:
    """``tiny`` (the recipe's own random Llama, 32 wide) or ``WIDTHxLAYERS`` of a larger random one."""
    if text == "tiny":
        return None
    try:
        width, layers = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--lora-base: expected tiny or WIDTHxLAYERS like 2048x16, got {text!r}") from None
    if width <= 0 or layers <= 0 or width % 4:
        raise SystemExit(f"--lora-base: WIDTH must be a positive multiple of 4 (the heads), got {text!r}")
    return width, layers


def lora_rows(raw: dict[str, Any], base: tuple[int, int] | None = None) -> list[Row]:
    """Whole ``lightdist fit`` commands of the LoRA recipe (2 steps), pool and ``ddp_spawn``: Python
    start, imports, loading the base and the pool's start included, one run each. ``base``: (width,
    layers) of a larger random Llama (~16 x width^2 parameters a layer) instead of the tiny one; its
    steps are kept short (2 rows of 32 tokens a batch, no validation): the row is about the base."""
    import importlib.util

    from lightdist.cli._catalog import configs_root

    configs = configs_root()
    if not (configs / "lora_causal_lm/cpu.yaml").is_file() or not importlib.util.find_spec("peft"):
        return [Row("LoRA: not measured (no lora_causal_lm/cpu config or no peft)", "-")]
    scratch = Path(tempfile.mkdtemp(prefix="lightdist-bench-models-lora-"))
    make = [sys.executable, "-m", "lightdist.recipes.tiny_models", "causal-lm", "runs/tiny-causal-lm"]
    fit = ["fit", "--config", "lora_causal_lm/cpu", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]
    label = "LoRA tiny Llama"
    if base is not None:
        width, layers = base
        params = layers * 16 * width * width + 2000 * width  # attention 4 w^2, MLP 12 w^2 a layer; tied embedding
        make += ["--hidden-size", str(width), "--layers", str(layers)]
        fit += LORA_LIGHT
        label = f"LoRA random Llama {params / 1e9:.2f}B ({width}x{layers})"
    subprocess.run(make, cwd=scratch, check=True, capture_output=True, timeout=900)
    pool, spawn = measure(fit, scratch), measure([*fit, "--trainer.strategy=ddp_spawn"], scratch)
    raw.update(
        label=label,
        pool_s=pool.seconds,
        pool_peak_mib=pool.peak_mib,
        pool_rc=pool.returncode,
        spawn_s=spawn.seconds,
        spawn_peak_mib=spawn.peak_mib,
        spawn_rc=spawn.returncode,
        scratch=str(scratch),
    )
    ok = pool.returncode == spawn.returncode == 0
    if not ok:
        for name, run in (("pool", pool), ("ddp_spawn", spawn)):
            if run.returncode:
                print(f"{label}, {name}: exit {run.returncode}; last output:\n{run.stdout[-2000:]}", flush=True)
        return [
            Row(
                f"{label}: a command failed",
                f"exit {pool.returncode} (pool)",
                f"exit {spawn.returncode} (ddp_spawn)",
                "-",
                "-",
                "FAIL",
            )
        ]
    return [
        compare(f"{label}, lightdist fit 2 steps, whole command (s)", pool.seconds, spawn.seconds, "ddp_spawn", None),
        compare(
            f"{label}, whole command, peak PSS (GB)", pool.peak_mib / 1024, spawn.peak_mib / 1024, "ddp_spawn", 1.0
        ),
    ]


def run_models(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [(text.strip(), parse_size(text)) for text in args.sizes.split(",") if text.strip()]
    contenders = _choice("--contenders", args.contenders, tuple(CONTENDERS))
    variants = _choice("--variants", args.variants, ("full", "frozen"))
    lora_base = parse_lora_base(args.lora_base)  # bad input fails before anything runs
    with sigterm_exits():
        return _measure_models(args, sizes, contenders, variants, lora_base)


def _measure_models(
    args: argparse.Namespace,
    sizes: list[tuple[str, int]],
    contenders: list[str],
    variants: list[str],
    lora_base: tuple[int, int] | None,
) -> dict[str, Any]:
    info = machine()
    print(
        f"lightdist.bench models: {info['date']}, Python {info['python']}, torch {info['torch']}, "
        f"lightning {L.__version__}, {info['cpus']} CPUs, load {info['loadavg']}",
        flush=True,
    )
    rows: list[Row] = []
    raw: list[dict[str, Any]] = []
    failures: list[tuple[str, Result]] = []
    for label, params in sizes:
        width, layers = shape(params)
        print(
            f"{label}: {layers} x Linear({width}, {width}) = {layers * width * width / 1e6:.1f}M parameters, "
            f"{layers * width * width * 4 / 2**30:.2f} GB",
            flush=True,
        )
        for variant in variants:
            results: dict[str, Result] = {}
            for name in contenders:
                if variant == "frozen" and name not in FROZEN_CONTENDERS:
                    continue
                results[name] = result = run_child(name, width, layers, variant == "frozen", args)
                print(
                    f"  {label} {variant} {name}: {result.error or result.seconds} "
                    f"(warm-up {result.first_s}), peak {result.peak_gb:.2f} GB",
                    flush=True,
                )
                raw.append(
                    {
                        "size": label,
                        "params": layers * width * width,
                        "width": width,
                        "layers": layers,
                        "variant": variant,
                        "contender": name,
                        "seconds": result.seconds,
                        "first_s": result.first_s,
                        "peak_gb": result.peak_gb,
                        "error": result.error,
                    }
                )
                if result.error:
                    failures.append((f"{label} {variant} {name}", result))
            rows += variant_rows(f"{label} {variant}", args.fits, results)
    lora: dict[str, Any] = {}
    if args.lora:
        rows += lora_rows(lora, lora_base)
    print(format_table(rows))
    for what, result in failures:
        print(f"  {what}: {result.error}; its stderr ends:\n{result.stderr_tail}")
    return {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, "results": raw, "lora": lora}


if __name__ == "__main__":
    # Through the package's name, so that pickles (ddp_spawn, the pool) name lightdist.bench.models,
    # not __main__.
    from lightdist.bench.models import child_main as _child_main

    _child_main(sys.argv[1:])
