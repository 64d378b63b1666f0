"""``_PoolLauncher``: runs the Trainer's entry point on the warm pool and brings the results back.

``launch`` is what ``trainer.fit/validate/test/predict`` end up calling. It ships the Trainer and
the entry point in one pickle (sent once, the same bytes to every rank), waits for the pool, then
makes the driver's Trainer and model look as after a single-process run: trained weights in the
user's model object, trainer state, metrics, fit-loop progress (so a second ``fit`` continues),
callback state (ModelCheckpoint paths and scores), and the model/datamodule attached.
"""

from __future__ import annotations

import os
import secrets
import warnings
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightdist import protocol
from lightdist._output_state import capture as output_state
from lightdist.errors import PayloadError, WorkerDiedError
from lightdist.lightning import _callback_state, _compat
from lightdist.lightning._bar import BarMirror
from lightdist.lightning._optimizer_state import OptimizersOnRanks, Unavailable
from lightdist.lightning.checkpoint_io import remove_stale_temp_files
from lightdist.runner import DistributedRunner

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightdist.lightning.strategy import PoolStrategy

__all__ = ["_PoolLauncher"]

_SEED_VARS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


class _PoolLauncher(_compat.Launcher):
    def __init__(self, strategy: PoolStrategy) -> None:
        self._strategy = strategy

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return True  # nothing is forked from or re-executed in the driver

    @override
    def launch(self, function: Any, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        runner = self._strategy.pool()
        if trainer is not None:
            for logger in trainer.loggers:
                _ = logger.version  # resolve in the driver, so every rank writes the folder it reports
            _remove_stale_checkpoint_writes(trainer)
        # Ctrl-C: the ranks agree on a batch, stop there and send back the state so far, which is
        # applied like any result. KeyboardInterrupt is not re-raised: Lightning would set SIGINT to
        # SIG_IGN for good and call sys.exit(1), which in a notebook disables "interrupt kernel".
        # Named from here on: the ranks call the entry point with keywords only (see _compat).
        arguments = _compat.entry_point_kwargs(function, args, kwargs)
        if trainer is not None:
            _attach(trainer, arguments)
        bar = _progress_bar(trainer, arguments)
        hub = self._strategy.hub

        def on_event(event: dict[str, Any]) -> None:
            if bar is not None:
                bar(event)
            hub.publish(event)

        fn = trainer.state.fn.value if trainer is not None and trainer.state.fn is not None else None
        keep = self._keep_token(fn, runner)
        if fn == "fit":
            self._strategy._optimizers_from(None)  # this fit's replace the last fit's, here and on rank 0
        outcome: dict[str, Any] = {"event": "end", "fn": fn, "interrupted": False, "error": None}
        restarts = 0
        failure: BaseException | None = None
        if bar is not None:
            bar.start()
        try:
            while True:
                # Trainer and entry point in one payload (function.__self__ is trainer on the ranks
                # too). Resident: the model's tensors stay on the ranks for the next call, and what
                # training changed is written back into this model's own tensors.
                job = (trainer, function, arguments)
                payload = {"job": job, "env": _seed_env(), "flags": _torch_flags(), "output": output_state()}
                if keep is not None:
                    payload["keep_state"] = keep
                try:
                    out, interrupted = runner.invoke_interruptible(payload, on_item=on_event, resident=True)
                    break
                except PayloadError as exc:
                    raise TypeError(_unpicklable(exc, trainer, arguments)) from exc
                except WorkerDiedError as exc:
                    if fn != "fit" or restarts >= self._strategy.max_restarts:
                        raise
                    restarts += 1
                    rank_zero_warn(
                        f"{exc}: resuming the fit from its last checkpoint on the recovered pool "
                        f"(restart {restarts} of {self._strategy.max_restarts})"
                    )
                    arguments = _compat.resume_fit_from(arguments, "last")
            outcome["interrupted"] = interrupted
        except BaseException as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            failure = exc
            raise
        finally:
            if bar is not None:
                bar.finish(failure, outcome["interrupted"])
            hub.publish(outcome)
        if interrupted:
            rank_zero_info("Ctrl-C: every rank stopped at the same batch; the pool stays warm")
        if trainer is not None and out is not None:
            _apply(out, trainer, arguments)
            if fn == "fit":
                self._strategy._optimizers_from(self._optimizer_source(runner, keep, trainer))
        return None if out is None else out["results"]

    def _keep_token(self, fn: str | None, runner: Any) -> str | None:
        """The token a fit leaves its optimizers under on rank 0, for the driver to fetch them when
        they are read (see _optimizer_state); "": rank 0 drops the last fit's and keeps none; None:
        not a fit on this process's own pool."""
        if fn != "fit" or not isinstance(runner, DistributedRunner):
            return None
        return secrets.token_hex(8) if self._strategy.keep_optimizer_state else ""

    def _optimizer_source(self, runner: Any, keep: str | None, trainer: pl.Trainer) -> OptimizersOnRanks | Unavailable:
        """Where the driver finds the optimizers of the fit that just ended (see _optimizer_state)."""
        if keep:
            return OptimizersOnRanks(runner, keep, trainer, trainer.lightning_module)
        where = (
            "PoolStrategy(keep_optimizer_state=False) freed the fit's optimizer and LR scheduler state on the ranks"
            if not self._strategy.keep_optimizer_state
            else "a fit on a server's pool (PoolStrategy(server=...)) leaves its optimizer and LR scheduler state "
            "on the server's ranks, where the driver cannot read it"
        )
        return Unavailable(
            f"{where}; save checkpoints with ModelCheckpoint (it runs on the ranks), or "
            "trainer.save_checkpoint(path, weights_only=True)"
        )

    @override
    def kill(self, signum: Any) -> None:
        pass  # the pool owns its processes; cancellation goes through it


def _progress_bar(trainer: pl.Trainer | None, arguments: dict[str, Any]) -> BarMirror | None:
    """The Trainer's own progress bar callback, run in the driver on rank 0's events (None when
    the Trainer draws no bar)."""
    callback = trainer.progress_bar_callback if trainer is not None else None
    if trainer is None or callback is None:
        return None
    model = _compat.entry_point_model(arguments)
    return BarMirror(trainer, callback, model if model is not None else trainer.lightning_module)


def _remove_stale_checkpoint_writes(trainer: pl.Trainer) -> None:
    # What a killed driver's ranks were writing when they died (each up to a checkpoint's size):
    # the ranks also sweep before their first write, but a run may never write there again.
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            remove_stale_temp_files(dirpath)


def _seed_env() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in _SEED_VARS}


def _torch_flags() -> dict[str, Any]:
    # Never the CUDA RNG or device state: reading them would initialise CUDA in the driver.
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": torch.get_default_dtype(),
    }


def _apply(out: dict[str, Any], trainer: pl.Trainer, arguments: dict[str, Any]) -> None:
    model = trainer.lightning_module
    # The tensors the driver sent were written back in place already (resident call); "weights"
    # holds only entries the ranks created themselves (e.g. layers built in configure_model).
    if out["weights"]:
        _, unexpected = model.load_state_dict(out["weights"], strict=False)
        if unexpected:
            warnings.warn(
                f"the trained weights did not match the driver's model: unexpected keys {list(unexpected)} "
                "(did the model add layers in a hook? build them in __init__ to have them in the driver)",
                stacklevel=3,
            )
    trainer.state.fn = out["state"].fn
    trainer.state.status = out["state"].status
    trainer.state.stage = out["state"].stage
    _compat.restore_metrics(trainer, out["callback_metrics"], out["logged_metrics"], out["progress_bar_metrics"])
    if out["fit_loop"] is not None:
        trainer.fit_loop.load_state_dict(out["fit_loop"])
        _compat.clear_fit_restarting(trainer)  # a second fit continues like a single-process Trainer
        trainer.should_stop = out["should_stop"]  # EarlyStopping's verdict, as in-process
    # Attributes first, then each callback's own state_dict (which knows best what it holds).
    _callback_state.apply(trainer, out["callback_attributes"])
    states = out["callbacks"]
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        state = states.get(callback.state_key)
        if state is None:
            continue
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = state.get("dirpath")  # load_state_dict ignores most fields otherwise
        callback.load_state_dict(state)
    _compat.set_module_trainer(model, trainer)
    datamodule = _datamodule_arg(arguments)
    if datamodule is not None:  # as the Trainer would have in-process: loops, hooks, back-reference
        _compat.attach_datamodule(trainer, model, datamodule)


def _attach(trainer: pl.Trainer, arguments: dict[str, Any]) -> None:
    """Point the call's model and datamodule at ``trainer`` before they are pickled.

    Lightning does this first thing in ``_fit_impl`` (and the other entry points), which here run on
    the ranks: until then a model or datamodule used with an earlier Trainer still points at that
    one, and would carry it to every rank with everything it holds: its model, optimizers, loops."""
    from lightning.pytorch import LightningDataModule, LightningModule

    for arg in (*arguments.values(), trainer.lightning_module):
        if isinstance(arg, LightningModule) and _compat.module_trainer(arg) is not trainer:
            arg.trainer = trainer
        elif isinstance(arg, LightningDataModule) and arg.trainer is not trainer:
            arg.trainer = trainer


def _datamodule_arg(arguments: dict[str, Any]) -> Any:
    # It may come as the datamodule argument or as the dataloaders argument (Lightning accepts
    # both): take whichever argument is one.
    from lightning.pytorch import LightningDataModule

    return next((a for a in arguments.values() if isinstance(a, LightningDataModule)), None)


def _unpicklable(exc: Exception, trainer: pl.Trainer | None, arguments: dict[str, Any]) -> str:
    """Name what could not travel to the ranks, down to the attribute, and say what to do."""
    # Numbered by parameter position (the model is argument 0), as Lightning's call passes them.
    suspects: list[tuple[str, Any]] = [(f"argument {i}", a) for i, a in enumerate(arguments.values()) if a is not None]
    if trainer is not None:
        suspects += [(f"callback {type(cb).__name__}", cb) for cb in trainer.callbacks]  # type: ignore[attr-defined]
        suspects += [(f"logger {type(lg).__name__}", lg) for lg in trainer.loggers]
    for label, obj in suspects:
        path = _first_unpicklable(obj, label)
        if path is not None:
            return (
                f"{path} cannot be sent to the lightdist pool ({exc}); make it picklable, or create it "
                "in the ranks (in setup() or configure_model()) instead of in __init__"
            )
    return f"the Trainer cannot be sent to the lightdist pool: {exc}"


def _first_unpicklable(obj: Any, path: str, depth: int = 0) -> str | None:
    from lightning.pytorch import Trainer

    try:
        protocol.dumps(obj)
        return None
    except Exception:
        pass
    children = vars(obj) if hasattr(obj, "__dict__") else {}
    if isinstance(obj, torch.nn.Module):
        children = {**children, **dict(obj.named_children())}
    if depth < 4:
        for name, value in children.items():
            # A back-reference to a Trainer leads to everything at once: the Trainer is checked on its own.
            if name.startswith("__") or value is obj or isinstance(value, Trainer):
                continue
            found = _first_unpicklable(value, f"{path}.{name}", depth + 1)
            if found is not None:
                return found
    return f"{path} ({type(obj).__qualname__})"
