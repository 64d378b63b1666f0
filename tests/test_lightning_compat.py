"""Pins the Lightning private API lightdist uses (all of it wrapped in ``lightdist/lightning/_compat.py``).

After a Lightning upgrade this is the file that fails, with a message naming the private that
changed; fix that wrapper in ``_compat.py`` and raise ``_compat.SUPPORTED``. Real Trainers on CPU,
one process, no pool: a few seconds.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerStatus
from torch.utils.data import DataLoader, TensorDataset

from lightdist.lightning import _compat

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def pinned(private: str) -> Iterator[None]:
    """Fail with the name of the Lightning private whose use raised, and what to do about it."""
    try:
        yield
    except Exception as exc:
        pytest.fail(
            f"Lightning {_compat.LIGHTNING_VERSION} changed {private}: {type(exc).__name__}: {exc} "
            "(update its wrapper in lightdist/lightning/_compat.py)"
        )


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.log("val_loss", self.layer(batch[0]).pow(2).mean())

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.log("test_loss", self.layer(batch[0]).pow(2).mean())

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return loader()


def loader(n: int = 8) -> DataLoader[tuple[torch.Tensor, ...]]:
    return DataLoader(TensorDataset(torch.arange(2.0 * n).reshape(n, 2)), batch_size=2)


def make_trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return L.Trainer(**options)


class InProcessLauncher(_compat.Launcher):
    """The pool launcher's first step without the pool: name the entry point's arguments as
    Lightning passes them, then call it by keyword, in this process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        arguments = _compat.entry_point_kwargs(function, args, kwargs)
        self.calls.append((function.__name__, arguments))
        return function(**arguments)

    def kill(self, signum: Any) -> None:
        pass


def launched_trainer(**kwargs: Any) -> tuple[L.Trainer, InProcessLauncher]:
    trainer = make_trainer(**kwargs)
    launcher = InProcessLauncher()
    with pinned("Strategy._launcher"):
        _compat.set_launcher(trainer.strategy, launcher)
        assert trainer.strategy.launcher is launcher
    return trainer, launcher


# --- the version range ---------------------------------------------------------------------------


def test_installed_lightning_is_inside_the_supported_range() -> None:
    assert _compat.is_supported(), (
        f"lightning {_compat.LIGHTNING_VERSION} is outside lightdist's supported range {_compat.SUPPORTED}: "
        "run this file, fix the wrappers it names in lightdist/lightning/_compat.py, then widen SUPPORTED"
    )
    assert not _compat.is_supported("2.3.3") and not _compat.is_supported("9.0.0")


def test_supported_lower_bound_is_the_one_pyproject_requires() -> None:
    required = re.search(r'"lightning(>=[0-9.]+)', (ROOT / "pyproject.toml").read_text())
    assert required is not None, "pyproject.toml no longer requires lightning>=..."
    assert _compat.SUPPORTED[0] == required.group(1), (
        f"pyproject.toml requires lightning{required.group(1)} but _compat.SUPPORTED starts at {_compat.SUPPORTED[0]}"
    )


# --- shapes of the privates ----------------------------------------------------------------------


@pytest.mark.parametrize("name", _compat.ENTRY_POINTS)
def test_entry_points_take_the_arguments_lightdist_names(name: str) -> None:
    method = getattr(L.Trainer, name, None)
    assert callable(method), f"Trainer.{name} is gone: lightdist's launcher receives it from Lightning"
    params = inspect.signature(method).parameters
    for needed in ("model", "ckpt_path"):
        assert needed in params, f"Trainer.{name} has no parameter {needed!r} (it has {list(params)})"
        assert params[needed].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"Trainer.{name}({needed}=) is not named"
    assert next(iter(params)) == "self" and list(params)[1] == "model", (
        f"Trainer.{name}: model is not its first argument"
    )


def test_interrupt_and_teardown_exist_with_their_arguments() -> None:
    assert callable(getattr(call, "_interrupt", None)), "lightning.pytorch.trainer.call._interrupt is gone"
    assert list(inspect.signature(call._interrupt).parameters) == ["trainer", "exception"], (
        f"lightning.pytorch.trainer.call._interrupt takes {inspect.signature(call._interrupt)} now"
    )
    assert callable(getattr(L.Trainer, "_teardown", None)), "Trainer._teardown is gone"
    assert list(inspect.signature(L.Trainer._teardown).parameters) == ["self"], "Trainer._teardown takes arguments now"


@pytest.mark.parametrize("hook", _compat.OVERRIDDEN_HOOKS, ids=lambda hook: f"{hook[1]}.{hook[2]}")
def test_overridden_private_hooks_keep_their_parameters(hook: tuple[str, str, str, tuple[str, ...]]) -> None:
    import importlib

    module, cls, method, expected = hook
    found = getattr(getattr(importlib.import_module(module), cls), method, None)
    assert callable(found), f"{cls}.{method} is gone: lightdist overrides it, and the override would never run"
    params = tuple(inspect.signature(found).parameters)[1:]
    assert params == expected, f"{cls}.{method} takes {params} now, lightdist's override takes {expected}"


def test_a_real_trainer_has_the_private_attributes_lightdist_reads() -> None:
    trainer = make_trainer()
    for owner, path in [
        (trainer, "_logger_connector._callback_metrics"),
        (trainer, "_logger_connector._logged_metrics"),
        (trainer, "_logger_connector._progress_bar_metrics"),
        (trainer, "_data_connector.attach_datamodule"),
        (trainer, "predict_loop._combined_loader"),
        (trainer, "fit_loop.restarting"),
        (trainer, "fit_loop.epoch_loop.restarting"),
        (trainer, "fit_loop.epoch_loop.val_loop.restarting"),
        (trainer.strategy, "_launcher"),
        (Tiny(), "_trainer"),
    ]:
        value: Any = owner
        for part in path.split("."):
            assert hasattr(value, part), f"{type(owner).__name__}.{path} is gone (no {part!r})"
            value = getattr(value, part)
    strategy = DDPStrategy(find_unused_parameters=True)
    for name in ("_ddp_kwargs", "_process_group_backend"):
        assert hasattr(strategy, name), f"DDPStrategy.{name} is gone"


# --- the wrappers on real Trainers ---------------------------------------------------------------


def test_entry_points_run_by_keyword_as_the_pool_calls_them(tmp_path: Path) -> None:
    trainer, launcher = launched_trainer()
    model = Tiny()
    with pinned("Trainer._fit_impl's parameters"):
        trainer.fit(model, loader())
    name, arguments = launcher.calls[-1]
    assert name == "_fit_impl" and arguments["model"] is model and arguments["ckpt_path"] is None
    assert _compat.entry_point_model(arguments) is model and trainer.global_step == 1

    checkpoint = tmp_path / "one_step.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed, launcher = launched_trainer(max_steps=2)
    with pinned("Trainer._fit_impl(ckpt_path=)"):
        resumed.fit(Tiny(), loader(), ckpt_path=checkpoint)
    assert launcher.calls[-1][1]["ckpt_path"] == checkpoint, "Lightning's fit(ckpt_path=) is not _fit_impl's ckpt_path"
    assert resumed.global_step == 2, "_fit_impl(ckpt_path=...) by keyword did not resume from the checkpoint"
    assert _compat.resume_fit_from(launcher.calls[-1][1], "last")["ckpt_path"] == "last"

    for method, entry in [("validate", "_validate_impl"), ("test", "_test_impl"), ("predict", "_predict_impl")]:
        with pinned(f"Trainer.{entry}'s parameters"):
            getattr(resumed, method)(model, loader())
        name, arguments = launcher.calls[-1]
        assert name == entry and arguments["model"] is model, f"{method} no longer launches Trainer.{entry}(model=...)"


def test_predict_loaders_and_their_batch_indices() -> None:
    trainer, _ = launched_trainer()
    trainer.predict(Tiny(), loader(n=7))
    with pinned("trainer.predict_loop._combined_loader.flattened"):
        loaders = _compat.predict_loaders(trainer)
    assert len(loaders) == 1
    with pinned("_IndexBatchSamplerWrapper.seen_batch_indices"):
        indices = _compat.seen_batch_indices(loaders[0])
    assert indices == [[0, 1], [2, 3], [4, 5], [6]], (
        f"_IndexBatchSamplerWrapper.seen_batch_indices no longer records each batch's dataset indices: {indices}"
    )


def test_restore_metrics_shows_in_the_public_properties() -> None:
    trainer = make_trainer()
    with pinned("trainer._logger_connector._callback_metrics/_logged_metrics/_progress_bar_metrics"):
        _compat.restore_metrics(trainer, {"a": torch.tensor(1.0)}, {"b": torch.tensor(2.0)}, {"c": 3.0})
    assert trainer.callback_metrics == {"a": torch.tensor(1.0)}, "trainer._logger_connector._callback_metrics"
    assert trainer.logged_metrics == {"b": torch.tensor(2.0)}, "trainer._logger_connector._logged_metrics"
    assert trainer.progress_bar_metrics == {"c": 3.0}, "trainer._logger_connector._progress_bar_metrics"


def test_clear_fit_restarting_after_loading_a_fit_loop_state() -> None:
    done = make_trainer()
    done.fit(Tiny(), loader())
    trainer = make_trainer()
    trainer.fit_loop.load_state_dict(done.fit_loop.state_dict())
    loops = [trainer.fit_loop, trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop]
    # Why the wrapper exists: load_state_dict marks every loop as restarting.
    assert all(loop.restarting for loop in loops), "fit_loop.load_state_dict no longer sets the restarting flags"
    with pinned("the fit loops' restarting flags"):
        _compat.clear_fit_restarting(trainer)
    # FitLoop's own setter keeps its flag True for step-based training (max_steps): Lightning's rule.
    inner = loops[1:]
    assert not any(loop.restarting for loop in inner), "a fit loop's restarting flag is not where lightdist clears it"
    assert not any(loop.is_resuming for loop in loops), (
        "_Loop._resuming_from_checkpoint is not where lightdist clears it"
    )
    assert not any(loop._loaded_from_state_dict for loop in loops), "_Loop._loaded_from_state_dict moved"


def test_lightning_optimizers_read_hook_and_a_strategy_pickled_without_optimizers() -> None:
    class Hooked(SingleDeviceStrategy):
        pass

    reads: list[Any] = []
    _compat.hook_lightning_optimizers(Hooked, reads.append)
    trainer, model = make_trainer(strategy=Hooked(device=torch.device("cpu"))), Tiny()
    trainer.fit(model, loader())
    reads.clear()
    with pinned("LightningModule.optimizers() reading Strategy._lightning_optimizers"):
        wrapped = model.optimizers()
    assert reads == [trainer.strategy], "LightningModule.optimizers() no longer reads Strategy._lightning_optimizers"
    assert wrapped.optimizer is trainer.optimizers[0]
    state = _compat.without_optimizers(vars(trainer.strategy))
    assert set(state) == set(vars(trainer.strategy)), "Strategy's optimizer attributes were renamed"
    assert state["_optimizers"] == state["_lightning_optimizers"] == state["lr_scheduler_configs"] == []
    assert trainer.strategy.optimizers, "without_optimizers changed the strategy itself"


def test_attach_datamodule_and_module_trainer() -> None:
    trainer, model, data = make_trainer(), Tiny(), Data()
    with pinned("LightningModule._trainer"):
        assert _compat.module_trainer(model) is None
        _compat.set_module_trainer(model, trainer)
        assert model.trainer is trainer and _compat.module_trainer(model) is trainer
    with pinned("trainer._data_connector.attach_datamodule"):
        _compat.attach_datamodule(trainer, model, data)
    assert trainer.datamodule is data and data.trainer is trainer


class SeesExceptions(Callback):
    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.seen.append(exception)


def test_handle_interrupt_runs_on_exception_hooks_and_teardown_runs() -> None:
    hooks = SeesExceptions()
    trainer = make_trainer(callbacks=[hooks])
    trainer.fit(Tiny(), loader())
    error = RuntimeError("stopped on a rank")
    with pinned("lightning.pytorch.trainer.call._interrupt"):
        _compat.handle_interrupt(trainer, error)
    assert hooks.seen == [error] and trainer.state.status == TrainerStatus.INTERRUPTED, "call._interrupt"
    with pinned("Trainer._teardown"):
        _compat.teardown(trainer)


def test_strategy_privates() -> None:
    strategy = DDPStrategy(find_unused_parameters=True)
    with pinned("DDPStrategy._ddp_kwargs"):
        assert _compat.ddp_kwargs(strategy) == {"find_unused_parameters": True}
    with pinned("DDPStrategy._process_group_backend"):
        _compat.set_process_group_backend(strategy, "gloo")
    assert strategy.process_group_backend == "gloo", "DDPStrategy._process_group_backend is not what it reports"
    assert _compat.StrategyRegistryType.__name__ == "_StrategyRegistry"


# --- nobody adds one back ------------------------------------------------------------------------

# Lightning private names lightdist used outside _compat.py before, and the generic forms: a private
# imported from a Lightning module, or reached through one. A heuristic over code, comments stripped.
PRIVATE_USES = [
    r"\._logger_connector\b",
    r"\._data_connector\b",
    r"\._checkpoint_connector\b",
    r"\._callback_connector\b",
    r"\._(callback|logged|progress_bar)_metrics\b",
    r"\._results\b",
    r"\.restarting\b",
    r"\._(fit|validate|test|predict)_impl\b",
    r"\._run_stage\b",
    r"(?<!self)\._run\b",
    r"\._interrupt\b",
    r"\._call_and_handle_interrupt\b",
    r"\._teardown\b",
    r"\._combined_loader\b",
    r"\._trainer\b",
    r"\._launcher\b",
    r"\._ddp_kwargs\b",
    r"\._process_group_backend\b",
    r"[\"']seen_batch_indices[\"']",
    r"\b_Launcher\b",
    r"\b_StrategyRegistry\b",
    r"\b_IndexBatchSamplerWrapper\b",
    r"^\s*from\s+(lightning|pytorch_lightning|lightning_fabric)\S*\s+import\s+.*\b_[A-Za-z]",
    r"(?<![\w.])(lightning|pytorch_lightning|lightning_fabric)(\.\w+)*\._[A-Za-z]",
]


def test_no_module_but_compat_touches_a_lightning_private() -> None:
    pattern = re.compile("|".join(f"(?:{p})" for p in PRIVATE_USES))
    found = []
    for path in sorted((ROOT / "lightdist").rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, (
        "Lightning private API used outside lightdist/lightning/_compat.py (wrap it there):\n" + "\n".join(found)
    )


# --- Lightning Fabric ----------------------------------------------------------------------------


class RecordingFabricLauncher(_compat.FabricLauncher):
    """Records what Fabric hands its strategy's launcher, and runs nothing."""

    def __init__(self) -> None:
        self.launched: list[Any] = []

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        self.launched.append((function, args, kwargs))
        return None


def user_fn(fabric: Any, x: int) -> None:
    pass


def test_what_fabric_hands_its_launcher() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    launcher = RecordingFabricLauncher()
    with pinned("Fabric's Strategy._launcher"):
        _compat.set_fabric_launcher(fabric.strategy, launcher)
        assert fabric.strategy.launcher is launcher
    fabric.launch(user_fn, 3)
    function, args, _ = launcher.launched[-1]
    with pinned("Fabric._wrap_and_launch's partial(fabric._wrap_with_setup, fn)"):
        assert _compat.fabric_launch_parts(function) == (fabric, user_fn)
    assert args == (fabric, 3), "Fabric.launch(fn, *args) no longer hands the launcher (fabric, *args)"
    fabric.launch()  # no function: script mode
    with pinned("lightning.fabric.fabric._do_nothing"):
        assert _compat.fabric_launch_parts(launcher.launched[-1][0]) == (fabric, None)
    assert _compat.fabric_launch_parts(user_fn) == (None, user_fn)
