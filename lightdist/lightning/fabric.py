"""``Fabric(strategy="lightdist")``: Lightning Fabric's DDP on the warm lightdist pool.

``fabric.launch(fn, *args)`` runs ``fn(fabric, *args)`` on every rank of the process-wide pool of
the Fabric's layout (the very ranks ``Trainer(strategy="lightdist")`` uses for that layout) and
returns rank 0's return value, by value. As with Fabric's ``ddp_spawn``, ``fn`` and its arguments
travel to the ranks as copies: what ``fn`` changes in them on the ranks stays there. The ranks stay
up, so the second and later launches cost a call, not a process start.

Importing this module registers ``"lightdist"`` in Fabric's strategy registry (Fabric and the
Trainer keep separate registries; :mod:`lightdist.lightning` registers ``PoolStrategy`` in the
Trainer's and imports this module, so ``import lightdist`` before or after Lightning registers
both). See ``docs/fabric.md``.
"""

from __future__ import annotations

import functools
import random
import sys
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.fabric.strategies.ddp import DDPStrategy
from lightning.fabric.utilities.apply_func import move_data_to_device
from typing_extensions import override

from lightdist._output_state import capture as output_state
from lightdist.errors import PayloadError
from lightdist.lightning import _compat
from lightdist.lightning._worker import CancelledByCaller, _StopWhenCancelled
from lightdist.lightning.environment import PoolEnvironment
from lightdist.lightning.launcher import _first_unpicklable, _seed_env, _torch_flags
from lightdist.lightning.strategy import device_type, rank_device, shared_pool
from lightdist.runner import DistributedRunner
from lightdist.worker import DistributedWorker

__all__ = ["FabricPoolStrategy"]

_SCRIPT_MODE = (
    "Fabric(strategy='lightdist') runs code on the pool's ranks through a function: put the code that "
    "follows launch() in `def train(fabric, ...)` and call `fabric.launch(train, ...)` (launch() without a "
    "function needs processes that each run this whole script, e.g. strategy='ddp')"
)


class FabricPoolStrategy(DDPStrategy):
    """Lightning Fabric's DDP on a warm pool of ranks; registered as ``Fabric(strategy="lightdist")``.

    Example::

        def train(fabric, lr):
            model, optimizer = fabric.setup(MyModel(), torch.optim.SGD(...))
            loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=32))
            for x, y in loader:
                optimizer.zero_grad()
                fabric.backward(loss_fn(model(x), y))
                optimizer.step()
            return model.state_dict()              # rank 0's value comes back, on CPU

        fabric = Fabric(strategy="lightdist", accelerator="cpu", devices=2)
        state = fabric.launch(train, 0.1)          # the first launch starts the pool
        state = fabric.launch(train, 0.01)         # later launches (any Fabric) reuse its ranks

    Ctrl-C stops every rank at the same ``fabric.backward()`` and raises ``KeyboardInterrupt`` in
    the caller; the pool stays warm. Errors on a rank raise ``WorkerError`` (rank, traceback); a
    rank that dies raises ``WorkerDiedError``, and the pool replaces it before the next launch.

    Args:
        **kwargs: as for Fabric's ``DDPStrategy`` (e.g. ``find_unused_parameters``). ``timeout``,
            ``process_group_backend`` and ``start_method`` do not apply: the pool owns the processes
            and their process group.
    """

    def __init__(self, **kwargs: Any) -> None:
        for name in ("timeout", "process_group_backend", "start_method"):
            if name in kwargs:
                kwargs.pop(name)
                warnings.warn(f"FabricPoolStrategy ignores {name}=: the pool owns the process group", stacklevel=2)
        kwargs.setdefault("cluster_environment", PoolEnvironment())
        super().__init__(**kwargs)

    def pool(self) -> DistributedRunner:
        """The started pool this strategy runs on: the process-wide one of its layout, which
        ``Trainer(strategy="lightdist")`` of the same layout shares (started on first use)."""
        # Leased on every launch, never kept: lightdist.shutdown() or a Trainer's idle_timeout may
        # replace the shared pool between launches, and nothing of the driver's travels to the ranks.
        return shared_pool(self.num_processes, "cuda" if device_type(self.parallel_devices) == "cuda" else "cpu")

    # --- driver side -----------------------------------------------------------------------------
    # _configure_launcher is a private hook of DDPStrategy, overridden by name:
    # tests/test_lightning_compat.py pins it (lightdist.lightning._compat.OVERRIDDEN_HOOKS).
    @override
    def _configure_launcher(self) -> None:
        if self.num_nodes != 1:
            raise ValueError(
                f"Fabric(strategy='lightdist') runs on this host's pool, not across {self.num_nodes} nodes: "
                "use num_nodes=1 (pools across hosts run Trainers: see docs/multinode.md)"
            )
        if isinstance(self.cluster_environment, PoolEnvironment):
            self.cluster_environment._expected_world_size = self.num_processes
        _compat.set_fabric_launcher(self, _FabricPoolLauncher(self.pool))

    # --- rank side -------------------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        return rank_device(self.parallel_devices, self.local_rank)

    @override
    def setup_environment(self) -> None:
        # Fabric's own set-up reuses an initialised process group without checking it: check here.
        if not dist.is_initialized():
            raise RuntimeError("FabricPoolStrategy runs only on a lightdist pool's ranks: call fabric.launch(fn)")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"the pool's process group has {dist.get_world_size()} ranks but the Fabric expects {self.world_size}"
            )
        super().setup_environment()

    @override
    def backward(self, tensor: torch.Tensor, module: torch.nn.Module | None, *args: Any, **kwargs: Any) -> None:
        super().backward(tensor, module, *args, **kwargs)
        if _stopper is not None:
            # Every rank runs backward at the same steps (DDP needs it), so here the ranks can agree
            # on a caller's cancel and all stop at the same one; the check is Trainer's callback
            # (one small all-reduce every ~0.25 s), which reads only `.strategy.root_device`.
            _stopper.on_train_batch_end(SimpleNamespace(strategy=self))

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _compat.StrategyRegistryType) -> None:
        strategy_registry.register("lightdist", cls, description="DDP on a warm lightdist pool")


class _FabricPoolLauncher(_compat.FabricLauncher):
    """Runs what ``fabric.launch(fn, ...)`` hands its strategy's launcher on the pool's ranks."""

    def __init__(self, pool: Callable[[], DistributedRunner]) -> None:
        self._pool = pool  # the strategy's: started on first use

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return True  # nothing is forked from or re-executed in the driver

    @override
    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        fabric, user_function = _compat.fabric_launch_parts(function)
        if fabric is not None and user_function is None:
            raise TypeError(_SCRIPT_MODE)
        if fabric is not None:
            for logger in fabric.loggers:
                _ = logger.version  # resolve in the driver: rank 0 writes the folder the driver names
        runner = self._pool()
        # Function and arguments in one pickle: the Fabric the function is bound to is the one it
        # receives as its first argument on the ranks too.
        run = functools.partial(_run_on_rank, (function, args, kwargs), _rng_states())
        try:
            payload = {"run": run, "env": _seed_env(), "flags": _torch_flags(), "output": output_state()}
            out, interrupted = runner.invoke_interruptible(payload)
        except PayloadError as exc:
            user_args = args if fabric is None else args[1:]  # args[0] is the Fabric
            raise TypeError(_unpicklable(exc, user_function or function, user_args, kwargs)) from exc
        except TimeoutError as exc:  # Ctrl-C, and some rank reached no backward() within the grace period
            raise KeyboardInterrupt(
                f"fabric.launch() was interrupted: {exc}; the next launch runs on their replacements"
            ) from exc
        if interrupted or out["cancelled"]:
            # Not swallowed as the Trainer's launcher must (Lightning would sys.exit around it):
            # Fabric has no such wrapper, and the code after launch() must not run as if fn had.
            raise KeyboardInterrupt("fabric.launch() was interrupted; every rank stopped, the pool stays warm")
        return out["value"]


# The cancel check of the launch this rank runs now (a rank runs one call at a time, on its main thread).
_stopper: _StopWhenCancelled | None = None


def _run_on_rank(
    job: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]], rng: dict[str, Any], worker: DistributedWorker
) -> dict[str, Any] | None:
    """On every rank: the launched function, from the driver's random state; rank 0 replies."""
    global _stopper
    function, args, kwargs = job
    _set_rng_states(rng)
    _stopper = _StopWhenCancelled(worker)
    try:
        value = function(*args, **kwargs)
    except CancelledByCaller:
        return {"cancelled": True, "value": None}  # every rank stopped at the same backward
    finally:
        _stopper = None
    if worker.rank != 0:
        return None
    return {"cancelled": False, "value": move_data_to_device(value, torch.device("cpu"))}


def _rng_states() -> dict[str, Any]:
    # What Fabric's spawn launcher restores in each new process (torch, Python, NumPy), so a launch
    # after seeding draws what a ddp_spawn launch would. Never the CUDA RNG: reading it would
    # initialise CUDA in the driver.
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    numpy = sys.modules.get("numpy")  # not imported for this: a driver without NumPy has no NumPy state
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states:
        import numpy

        numpy.random.set_state(states["numpy"])


def _unpicklable(exc: Exception, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Name what could not travel to the ranks and say what to do."""
    suspects = [
        ("the launched function", function),
        *((f"argument {i + 1}", a) for i, a in enumerate(args)),
        *((f"argument {name}=", a) for name, a in kwargs.items()),
    ]
    found = next((path for label, obj in suspects if (path := _first_unpicklable(obj, label))), None)
    if found is None:
        return f"fabric.launch() cannot send its function and arguments to the lightdist pool: {exc}"
    return f"{found} cannot be sent to the lightdist pool ({exc}); make it picklable, or create it inside the function"


if "lightdist" not in STRATEGY_REGISTRY:
    FabricPoolStrategy.register_strategies(STRATEGY_REGISTRY)
