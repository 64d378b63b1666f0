"""Every use lightdist makes of Lightning's private API, in one place.

Lightning does not promise anything about names that start with ``_``; lightdist needs a few of
them because it runs the Trainer's entry point on other processes and then makes the driver's
Trainer look as if it had run in-process. Keeping them here means a Lightning upgrade is checked
in one module and one test (``tests/test_lightning_compat.py``), which fails naming the private
that moved. No other lightdist module touches a Lightning private name (that test greps for it).

Supported Lightning: :data:`SUPPORTED` (``lightning>=2.4,<2.7``). The lower bound is the one in
``pyproject.toml``; the upper bound is the first minor release nobody has checked these privates
against yet (tested with 2.6.6). To support a new Lightning release: install it, run
``pytest tests/test_lightning_compat.py``, fix the wrappers it names (the rest of lightdist does
not change), then raise the upper bound here.

What is wrapped, and why lightdist needs it:

=====================================  =========================================================
function                               Lightning private, and why
=====================================  =========================================================
:data:`Launcher`                       ``strategies.launchers.launcher._Launcher``: the base
                                       class of every launcher; the pool launcher is one.
:data:`StrategyRegistryType`           ``fabric.strategies.registry._StrategyRegistry``: the
                                       type ``register_strategies`` receives.
:func:`entry_point_kwargs`             the parameters of ``Trainer._fit_impl`` /
                                       ``_validate_impl`` / ``_test_impl`` / ``_predict_impl``:
                                       Lightning hands them to the launcher by position; lightdist
                                       names them so it never depends on their order.
:func:`entry_point_model`              their ``model`` parameter: the model a call trains.
:func:`resume_fit_from`                ``_fit_impl``'s ``ckpt_path``: a fit restarted after a rank
                                       died resumes from the last checkpoint.
:func:`handle_interrupt`               ``trainer.call._interrupt``: on_exception hooks and loggers
                                       finalised as failed, which Lightning runs only around the
                                       launcher, i.e. in the driver, never on the ranks.
:func:`teardown`                       ``Trainer._teardown``: strategy cleanup on a rank after an
                                       error, for the same reason.
:func:`restore_metrics`                ``trainer._logger_connector._callback_metrics`` (and
                                       ``_logged_metrics``, ``_progress_bar_metrics``): the public
                                       properties are read-only; the ranks' metrics are put there.
:func:`clear_fit_restarting`           the fit loops' ``restarting`` flags (and ``_Loop``'s
                                       ``_loaded_from_state_dict``/``_resuming_from_checkpoint``),
                                       which ``load_state_dict`` sets: cleared, a second ``fit``
                                       continues like a single-process one instead of resuming.
:func:`attach_datamodule`              ``trainer._data_connector.attach_datamodule``: the driver's
                                       Trainer and datamodule point at each other as in-process.
:func:`module_trainer`                 ``LightningModule._trainer``: the Trainer a model points at,
                                       ``None`` when none (the public property raises).
:func:`set_module_trainer`             ``LightningModule._trainer``, set without the public
                                       setter's walk over child modules.
:func:`predict_loaders`                ``trainer.predict_loop._combined_loader.flattened``: the
                                       rank's predict dataloaders, as a flat list.
:func:`seen_batch_indices`             ``_IndexBatchSamplerWrapper.seen_batch_indices``: the
                                       dataset indices of each predicted batch, to put every
                                       rank's predictions back in dataset order.
:func:`set_launcher`                   ``Strategy._launcher``: where ``_configure_launcher``
                                       installs the pool launcher.
:func:`ddp_kwargs`                     ``DDPStrategy._ddp_kwargs``: the user's DDP arguments, to
                                       build DDP without its start-up broadcast.
:func:`set_process_group_backend`      ``DDPStrategy._process_group_backend``: the backend of
                                       the pool's process group (Lightning did not create it).
:func:`default_checkpoint_io`          ``Strategy._checkpoint_io`` and ``_WrappingCheckpointIO``:
                                       the strategy's CheckpointIO with lightdist's atomic one in
                                       place of Lightning's default ``TorchCheckpointIO``.
:data:`FabricLauncher`                 ``fabric.strategies.launchers.launcher._Launcher``:
                                       Fabric's launcher base class (``Fabric(strategy=
                                       "lightdist")``'s launcher is one).
:func:`set_fabric_launcher`            Fabric's ``Strategy._launcher``, as for the Trainer's.
:func:`fabric_launch_parts`            what ``Fabric._wrap_and_launch`` hands a launcher:
                                       ``partial(fabric._wrap_with_setup, fn)``, or ``fn`` =
                                       ``fabric._do_nothing`` for ``launch()`` without a function.
:func:`hook_lightning_optimizers`      ``Strategy._lightning_optimizers``, which
                                       ``LightningModule.optimizers()`` reads: the driver fetches a
                                       fit's optimizers from rank 0 when they are first read.
:func:`without_optimizers`             ``Strategy._optimizers`` / ``_lightning_optimizers``: a
                                       pickled strategy leaves the driver's copies behind.
=====================================  =========================================================

:data:`OVERRIDDEN_HOOKS` lists the private methods lightdist *overrides* (a subclass must define
them under Lightning's name, so they stay in their classes); the test checks they still exist
with the same parameters.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning.pytorch
from lightning.fabric import fabric as _fabric_module
from lightning.fabric.strategies.launchers.launcher import _Launcher as _FabricLauncher
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer import call

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.fabric import Fabric
    from lightning.fabric.plugins import CheckpointIO
    from lightning.fabric.strategies.strategy import Strategy as FabricStrategy
    from lightning.pytorch.strategies import DDPStrategy, Strategy

__all__ = [
    "ENTRY_POINTS",
    "FabricLauncher",
    "LIGHTNING_VERSION",
    "OVERRIDDEN_HOOKS",
    "SUPPORTED",
    "Launcher",
    "StrategyRegistryType",
    "attach_datamodule",
    "clear_fit_restarting",
    "ddp_kwargs",
    "default_checkpoint_io",
    "entry_point_kwargs",
    "entry_point_model",
    "fabric_launch_parts",
    "handle_interrupt",
    "hook_lightning_optimizers",
    "is_supported",
    "module_trainer",
    "predict_loaders",
    "restore_metrics",
    "resume_fit_from",
    "seen_batch_indices",
    "set_fabric_launcher",
    "set_launcher",
    "set_module_trainer",
    "set_process_group_backend",
    "teardown",
    "without_optimizers",
]

# Read with getattr: the package sets it at import without listing it as an export.
LIGHTNING_VERSION: str = str(getattr(lightning.pytorch, "__version__"))  # noqa: B009 - see above
"""The installed Lightning's version (``pytorch_lightning``'s, for :mod:`lightdist.pytorch_lightning`)."""

SUPPORTED: tuple[str, str] = (">=2.4", "<2.7")
"""The Lightning versions these wrappers are written for (both bounds must hold)."""

Launcher = _Launcher
"""Lightning's launcher base class (``_Launcher``): ``PoolStrategy``'s launcher subclasses it."""

StrategyRegistryType = _StrategyRegistry
"""The class of Lightning's strategy registry (``_StrategyRegistry``), for type annotations."""

ENTRY_POINTS = ("_fit_impl", "_validate_impl", "_test_impl", "_predict_impl")
"""The Trainer methods Lightning hands to ``launcher.launch``; each takes ``model`` and ``ckpt_path``."""

OVERRIDDEN_HOOKS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # (module, class, method, its parameters after self)
    ("lightning.pytorch.strategies", "DDPStrategy", "_configure_launcher", ()),
    ("lightning.pytorch.strategies", "DDPStrategy", "_setup_model", ("model",)),
    ("lightning.pytorch.cli", "LightningCLI", "_prepare_subcommand_parser", ("klass", "subcommand", "kwargs")),
    ("lightning.fabric.strategies", "DDPStrategy", "_configure_launcher", ()),
)
"""Private methods lightdist overrides: ``PoolStrategy`` installs its launcher and builds DDP
without the start-up broadcast; ``LightdistCLI`` adds ``--predictions_file`` to ``predict`` only;
``FabricPoolStrategy`` installs its launcher."""


def is_supported(version: str = LIGHTNING_VERSION) -> bool:
    """Whether ``version`` of Lightning is inside :data:`SUPPORTED`."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(",".join(SUPPORTED)).contains(version, prereleases=True)


# --- the Trainer's entry points ------------------------------------------------------------------


def entry_point_kwargs(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a Trainer entry point (``trainer._fit_impl`` ...) by name, in parameter order.

    Lightning calls ``launcher.launch(trainer._fit_impl, model, train_dataloaders, ...)`` with
    positional arguments; named, they are called with keywords only and read by name, so a new or
    reordered parameter in a later Lightning cannot shift ``ckpt_path`` into another's place.
    """
    return dict(inspect.signature(function).bind(*args, **kwargs).arguments)


def entry_point_model(kwargs: dict[str, Any]) -> Any:
    """The ``model`` argument of an entry point's named arguments (``None`` when not given)."""
    return kwargs.get("model")


def resume_fit_from(kwargs: dict[str, Any], ckpt_path: str) -> dict[str, Any]:
    """``_fit_impl``'s named arguments with ``ckpt_path`` replaced (``"last"``: resume a restarted fit)."""
    return {**kwargs, "ckpt_path": ckpt_path}


def handle_interrupt(trainer: pl.Trainer, exception: BaseException) -> None:
    """Mark the Trainer interrupted, run ``on_exception`` hooks and finalise loggers as failed.

    Wraps ``lightning.pytorch.trainer.call._interrupt``. Lightning runs it around the launcher, in
    the driver; on a rank the entry point is called directly, so the worker runs it itself.
    """
    call._interrupt(trainer, exception)


def teardown(trainer: pl.Trainer) -> None:
    """Tear the Trainer's run down (strategy, loops, model to CPU) after an error or a cancel.

    Wraps ``Trainer._teardown``, which Lightning calls next to ``_interrupt`` for the same reason."""
    trainer._teardown()


# --- the driver's Trainer after a call -----------------------------------------------------------


def restore_metrics(
    trainer: pl.Trainer,
    callback_metrics: dict[str, Any],
    logged_metrics: dict[str, Any],
    progress_bar_metrics: dict[str, Any],
) -> None:
    """Put the ranks' metrics where ``trainer.callback_metrics`` (etc.) read them.

    Wraps ``trainer._logger_connector._callback_metrics`` / ``_logged_metrics`` /
    ``_progress_bar_metrics``: the public properties have no setter."""
    connector = trainer._logger_connector
    connector._callback_metrics.update(callback_metrics)
    connector._logged_metrics.update(logged_metrics)
    connector._progress_bar_metrics.update(progress_bar_metrics)


def clear_fit_restarting(trainer: pl.Trainer) -> None:
    """Clear the ``restarting`` flags ``fit_loop.load_state_dict`` sets on the fit loops.

    Left set, the next ``fit`` on this Trainer would behave as if resumed from a checkpoint mid
    epoch; cleared, it continues like a single-process Trainer's second ``fit``."""
    trainer.fit_loop.restarting = False
    trainer.fit_loop.epoch_loop.restarting = False
    trainer.fit_loop.epoch_loop.val_loop.restarting = False
    # load_state_dict also marks every loop as resumed from a checkpoint (fit_loop.is_resuming),
    # which an in-process Trainer's loops are not after a fit.
    loops: list[_Loop] = [trainer.fit_loop]
    while loops:
        loop = loops.pop()
        loop._loaded_from_state_dict = False
        loop._resuming_from_checkpoint = False
        loops.extend(child for child in vars(loop).values() if isinstance(child, _Loop))


def attach_datamodule(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """Point the Trainer and ``datamodule`` at each other, as ``_fit_impl`` does in-process.

    Wraps ``trainer._data_connector.attach_datamodule``."""
    trainer._data_connector.attach_datamodule(model, datamodule=datamodule)


def module_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer ``module`` points at, or ``None``: reads ``LightningModule._trainer``, because
    the public ``module.trainer`` raises when none is attached."""
    return module._trainer


def set_module_trainer(module: pl.LightningModule, trainer: pl.Trainer) -> None:
    """Point ``module`` (itself only, not its child modules) at ``trainer``: sets ``LightningModule._trainer``."""
    module._trainer = trainer


# --- predict on the ranks ------------------------------------------------------------------------


def predict_loaders(trainer: pl.Trainer) -> list[Any]:
    """The rank's predict dataloaders as one flat list (one per dataloader the user passed).

    Wraps ``trainer.predict_loop._combined_loader.flattened``: ``trainer.predict_dataloaders``
    returns them in the user's nesting (a dict, a list...), not flat."""
    combined = trainer.predict_loop._combined_loader
    if combined is None:
        raise RuntimeError("the predict loop has no dataloaders: predict_loaders needs a finished predict call")
    return list(combined.flattened)


def seen_batch_indices(loader: Any) -> list[list[int]]:
    """The dataset indices of each batch ``loader`` gave in its last pass ([] when not recorded).

    Lightning records them in ``_IndexBatchSamplerWrapper.seen_batch_indices``, the batch sampler
    it wraps around a predict dataloader's."""
    indices: list[list[int]] = getattr(loader.batch_sampler, "seen_batch_indices", [])
    return indices


# --- the strategy --------------------------------------------------------------------------------


def set_launcher(strategy: Strategy, launcher: _Launcher) -> None:
    """Install ``launcher`` on ``strategy`` (``Strategy._launcher``), as ``_configure_launcher`` must."""
    strategy._launcher = launcher


def ddp_kwargs(strategy: DDPStrategy) -> dict[str, Any]:
    """The keyword arguments ``strategy`` passes to ``DistributedDataParallel`` (``DDPStrategy._ddp_kwargs``)."""
    kwargs: dict[str, Any] = strategy._ddp_kwargs
    return kwargs


def set_process_group_backend(strategy: DDPStrategy, backend: str) -> None:
    """Record the backend of a process group Lightning did not create (``DDPStrategy._process_group_backend``)."""
    strategy._process_group_backend = backend


def hook_lightning_optimizers(cls: type[Strategy], before_read: Callable[[Any], None]) -> None:
    """Make ``cls``'s ``_lightning_optimizers`` call ``before_read(strategy)`` before it is read.

    ``LightningModule.optimizers()`` reads ``Strategy._lightning_optimizers`` (the
    ``LightningOptimizer`` wrappers), not the public ``optimizers``. The value stays in the
    instance's ``__dict__`` under the same name, so ``Strategy.__getstate__``/``__setstate__``
    and Lightning's own assignments work unchanged."""
    name = "_lightning_optimizers"

    def read(self: Strategy) -> Any:
        before_read(self)
        return self.__dict__.get(name, [])

    def write(self: Strategy, value: Any) -> None:
        self.__dict__[name] = value

    setattr(cls, name, property(read, write))


def without_optimizers(state: dict[str, Any]) -> dict[str, Any]:
    """A strategy's ``__dict__`` (a copy, to pickle) without its optimizers and LR schedulers
    (``Strategy._optimizers``, ``_lightning_optimizers``, ``lr_scheduler_configs``)."""
    return {**state, "_optimizers": [], "_lightning_optimizers": [], "lr_scheduler_configs": []}


def default_checkpoint_io(strategy: Strategy, make: Callable[[], CheckpointIO]) -> CheckpointIO:
    """``strategy.checkpoint_io`` with ``make()`` where Lightning would use ``TorchCheckpointIO()``.

    Reads ``Strategy._checkpoint_io`` (the public property installs Lightning's default); a
    ``_WrappingCheckpointIO`` (e.g. ``AsyncCheckpointIO``) given without a base gets ``make()`` too."""
    io = strategy._checkpoint_io
    if io is None:
        io = strategy._checkpoint_io = make()
    elif isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is None:
        io.checkpoint_io = make()
    return io


# --- Lightning Fabric ----------------------------------------------------------------------------

FabricLauncher = _FabricLauncher
"""Fabric's launcher base class (``_Launcher``): ``FabricPoolStrategy``'s launcher subclasses it."""


def set_fabric_launcher(strategy: FabricStrategy, launcher: _FabricLauncher) -> None:
    """Install ``launcher`` on a Fabric strategy (``Strategy._launcher``), as ``_configure_launcher`` must."""
    strategy._launcher = launcher


def fabric_launch_parts(function: Callable[..., Any]) -> tuple[Fabric | None, Callable[..., Any] | None]:
    """The Fabric and the user's function in what ``Fabric`` hands its strategy's launcher.

    ``Fabric._wrap_and_launch`` passes ``partial(fabric._wrap_with_setup, fn)``; ``fn`` is
    ``lightning.fabric.fabric._do_nothing`` for ``fabric.launch()`` without a function (script
    mode), returned here as ``None``. Anything else: ``(None, function)``."""
    if not isinstance(function, functools.partial) or getattr(function.func, "__name__", None) != "_wrap_with_setup":
        return None, function
    fabric = getattr(function.func, "__self__", None)
    if not isinstance(fabric, _fabric_module.Fabric) or not function.args:
        return None, function
    user_function: Callable[..., Any] = function.args[0]
    return fabric, None if user_function is _fabric_module._do_nothing else user_function
