"""``PoolStrategy``: Lightning's DDP on a warm lightdist pool.

A ``DDPStrategy`` (DDP wrapping, collectives and Lightning's special cases come for free) whose
launcher runs the Trainer's work on a pool of already-started ranks instead of starting processes,
and whose cluster environment answers from the pool's layout. Registered as
``Trainer(strategy="lightdist")``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightdist.lightning import _compat, _shared
from lightdist.lightning._optimizer_state import OptimizersOnRanks, Unavailable
from lightdist.lightning._worker import TrainerWorker, announce_group
from lightdist.lightning.checkpoint_io import AtomicCheckpointIO
from lightdist.lightning.environment import PoolEnvironment
from lightdist.lightning.events import EventHub
from lightdist.lightning.launcher import _PoolLauncher
from lightdist.runner import DistributedRunner

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import LRSchedulerConfig
    from torch.optim import Optimizer

    from lightdist.lightning._remote import RemoteRunner

__all__ = ["PoolStrategy", "device_type", "rank_device", "shared_pool"]

# One pool per layout, shared by every Trainer that asks for it (see _shared: how they end).
_pools = _shared.pools
_pools_lock = _shared.lock


def shared_pool(world_size: int, accelerator: str, idle_timeout: float | None = None) -> DistributedRunner:
    """The process-wide pool of :class:`~lightdist.lightning.TrainerWorker` ranks for this layout
    (``accelerator``: ``"cpu"`` or ``"cuda"``), started. Every Trainer and every
    ``Fabric(strategy="lightdist")`` of the same layout runs on it; ``idle_timeout``: see
    :class:`PoolStrategy`."""
    # The ranks preload the Lightning package this strategy belongs to (lightning or
    # pytorch_lightning, see lightdist.pytorch_lightning), so a fit pays no import.
    package = DDPStrategy.__module__.split(".")[0]
    runner = _shared.lease(
        (world_size, accelerator),
        lambda: DistributedRunner(TrainerWorker, world_size=world_size, accelerator=accelerator, preload=(package,)),
        idle_timeout,
    )
    # Leased on every call, never kept: lightdist.shutdown() or an idle stop may replace the
    # shared pool between two calls of a strategy.
    if not runner.is_alive():
        _start(runner)
    return runner


def device_type(parallel_devices: list[torch.device] | None) -> str:
    """``"cuda"``, ``"cpu"``, ...: the kind of device a strategy's layout asks for."""
    return (parallel_devices or [torch.device("cpu")])[0].type


def rank_device(parallel_devices: list[torch.device] | None, local_rank: int) -> torch.device:
    """A rank's own device: ``cuda:local_rank`` on GPUs (the device the pool gave it), not
    ``parallel_devices[local_rank]`` from the driver's view (wrong when a rank sees one GPU)."""
    if device_type(parallel_devices) == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class PoolStrategy(DDPStrategy):
    """Run ``fit``/``validate``/``test``/``predict`` on a warm pool of ranks.

    Example::

        trainer = Trainer(strategy="lightdist", accelerator="cpu", devices=2, max_epochs=3)
        trainer.fit(model, datamodule=dm)      # first call starts the pool; later ones reuse it

        # the warm pool of a `lightdist serve` process instead of one of this process's own
        trainer = Trainer(strategy=PoolStrategy(server="http://127.0.0.1:8765"), accelerator="cpu", devices=2)

    Args:
        runner: an explicit pool (a started or unstarted ``DistributedRunner`` of
            :class:`~lightdist.lightning.TrainerWorker`); by default a process-wide pool per
            (world size, accelerator) is used.
        server: run on a lightdist server's pool (see ``docs/server.md``): its URL
            (``http://HOST:PORT``, ``?token=...`` allowed), or ``"auto"`` for the one running from
            this host's default state directory. The calls queue behind the server's other jobs;
            the results land in this Trainer and model as with a local pool. Nothing connects
            until the Trainer is built (its layout is checked against the server's).
        token: the server's token (default: the URL's ``?token=``, else this host's token file).
        on_event: called in the driver with each progress event of rank 0 while a call runs
            (see :mod:`lightdist.lightning.events`); :meth:`events` is the ``async for`` form.
        idle_timeout: stop the shared pool this strategy uses after this many seconds without a
            call (the next call starts it again); None (default) keeps it until
            ``lightdist.shutdown()`` or interpreter exit. Only for the shared pool: an explicit
            ``runner=`` is yours to stop.
        max_restarts: when a rank dies during ``fit``, resume the fit from its last checkpoint
            (``ckpt_path="last"``: checkpoint with ``ModelCheckpoint(save_last=True)``) on the
            recovered pool, up to this many times; 0 raises ``WorkerDiedError`` at once.
        keep_optimizer_state: after a fit, rank 0 keeps its optimizers and LR schedulers until the
            next fit on the pool, and the driver fetches them when ``trainer.optimizers``,
            ``trainer.lr_scheduler_configs`` or ``trainer.save_checkpoint`` first needs them (see
            ``docs/lightning.md``). False frees them on the ranks when the fit ends (Adam: twice
            the model's size on rank 0 between fits); reading them in the driver then raises.
        **kwargs: as for ``DDPStrategy`` (e.g. ``find_unused_parameters``). ``timeout`` and
            ``process_group_backend`` do not apply: the pool owns the process group.
    """

    strategy_name = "lightdist"

    def __init__(
        self,
        runner: DistributedRunner | RemoteRunner | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        max_restarts: int = 0,
        server: str | None = None,
        token: str | None = None,
        idle_timeout: float | None = None,
        keep_optimizer_state: bool = True,
        **kwargs: Any,
    ) -> None:
        if idle_timeout is not None and (
            isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)) or idle_timeout <= 0
        ):
            raise ValueError(f"idle_timeout must be a number of seconds > 0 or None, got {idle_timeout!r}")
        if idle_timeout is not None and (runner is not None or server is not None):
            raise ValueError(
                "PoolStrategy(idle_timeout=...) applies to the shared pool; stop an explicit runner yourself"
            )
        self.idle_timeout = idle_timeout
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if not isinstance(keep_optimizer_state, bool):
            raise ValueError(f"keep_optimizer_state must be True or False, got {keep_optimizer_state!r}")
        self.max_restarts = max_restarts
        self.keep_optimizer_state = keep_optimizer_state
        for name in ("timeout", "process_group_backend", "start_method"):
            if name in kwargs:
                kwargs.pop(name)
                warnings.warn(
                    f"PoolStrategy ignores {name}=: the pool owns the process group (set "
                    "DistributedRunner(timeout=..., backend=...) for an explicit pool instead)",
                    stacklevel=2,
                )
        if server is not None:
            if runner is not None:
                raise ValueError("PoolStrategy takes runner= or server=, not both")
            from lightdist.lightning._remote import RemoteRunner

            runner = RemoteRunner(server, token=token)  # connects on first use, not here
        elif token is not None:
            raise ValueError("PoolStrategy(token=...) goes with server=URL")
        if isinstance(runner, DistributedRunner) and not issubclass(runner.worker_cls, TrainerWorker):
            raise TypeError(
                f"PoolStrategy(runner=...) needs a pool of lightdist.lightning.TrainerWorker, not "
                f"{runner.worker_cls.__qualname__}"
            )
        kwargs.setdefault("cluster_environment", PoolEnvironment())
        super().__init__(**kwargs)
        self._runner: DistributedRunner | RemoteRunner | None = runner
        self.hub = EventHub()
        if on_event is not None:
            self.hub.listeners.append(on_event)

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """``async for event in strategy.events()``: the events of the next (or running) Trainer call
        on this strategy, as rank 0 sends them, ending with an ``end`` event (see
        :mod:`lightdist.lightning.events`). Start iterating before the call, e.g. from a server's
        event loop while ``fit`` runs in a worker thread."""
        return self.hub.events()

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        # Lightning's default TorchCheckpointIO can leave a truncated last.ckpt (see checkpoint_io.py);
        # a CheckpointIO the user gives (plugins=[...]) is used as given.
        return _compat.default_checkpoint_io(self, AtomicCheckpointIO)

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        DDPStrategy.checkpoint_io.fset(self, io)  # type: ignore[attr-defined]

    # --- driver side -----------------------------------------------------------------------------
    # _configure_launcher and _setup_model are private hooks of DDPStrategy, overridden by name:
    # tests/test_lightning_compat.py pins them (lightdist.lightning._compat.OVERRIDDEN_HOOKS).
    @override
    def _configure_launcher(self) -> None:
        self._check_layout()
        _compat.set_launcher(self, _PoolLauncher(self))

    def _check_layout(self) -> None:
        world = self.num_nodes * self.num_processes
        if self._runner is not None and not isinstance(self._runner, DistributedRunner):
            self._check_server_layout(self._runner, world)
        else:
            self._check_pool_layout(self._runner, world)
        if isinstance(self.cluster_environment, PoolEnvironment):
            self.cluster_environment._expected_world_size = world

    def _check_pool_layout(self, runner: DistributedRunner | None, world: int) -> None:
        if self.num_nodes != 1 and (runner is None or runner.nodes != self.num_nodes):
            raise ValueError(
                f"num_nodes={self.num_nodes} needs a pool attached across that many hosts: "
                f"PoolStrategy(runner=DistributedRunner(TrainerWorker, world_size={world}, "
                f"nodes={self.num_nodes}, listen='tcp://ADDR:PORT', key_file=...)) and one "
                "'lightdist agent' per host (see docs/multinode.md)"
            )
        if runner is not None and runner.world_size != world:
            raise ValueError(
                f"the Trainer asks for {world} devices but the pool passed as runner= has "
                f"{runner.world_size} ranks; use devices={runner.world_size}"
            )

    def _check_server_layout(self, server: RemoteRunner, world: int) -> None:
        # The server's pool is what it is: say which Trainer arguments run on it.
        accelerator = self._device_type()
        if server.accelerator != accelerator:
            raise ValueError(
                f"the server at {server.url} runs its ranks on {server.accelerator}, but the Trainer asks for "
                f"{accelerator}; use accelerator={server.accelerator!r}"
            )
        if server.nodes != self.num_nodes or server.world_size != world:
            per_node = server.world_size // max(server.nodes, 1)
            nodes = f", num_nodes={server.nodes}" if server.nodes != 1 else ""
            raise ValueError(
                f"the Trainer asks for {world} devices but the server at {server.url} runs "
                f"{server.world_size} ranks; use devices={per_node}{nodes}"
            )

    def pool(self) -> DistributedRunner | RemoteRunner:
        """The started pool this strategy runs on (starts the shared one on first use), or the
        server's (``server=``), which the server keeps started."""
        if self._runner is not None and not isinstance(self._runner, DistributedRunner):
            return self._runner
        if self._runner is None:
            accelerator = "cuda" if self._device_type() == "cuda" else "cpu"
            return shared_pool(self.num_processes, accelerator, self.idle_timeout)
        if not self._runner.is_alive():
            _start(self._runner)
        return self._runner

    def _device_type(self) -> str:
        return device_type(self.parallel_devices)

    def __getstate__(self) -> dict[str, Any]:
        # The driver's copies of a fit's optimizers stay here too: the next fit builds its own on
        # the ranks, and they would travel with every call (twice the model's size for Adam).
        state = _compat.without_optimizers(self.__dict__)
        state["_runner"] = None  # the pool's handle stays in the driver
        state["hub"] = None  # so do the event listeners
        for name in ("_sent_unchanged", "_optimizers_source", "_fetching"):
            state.pop(name, None)  # a rank's view of one call; the driver's handle on rank 0's optimizers
        return state

    # --- a fit's optimizers in the driver (see lightdist.lightning._optimizer_state) -------------
    # They stay on rank 0 after a fit; the first read of any of these fetches them.
    @property
    @override
    def optimizers(self) -> list[Optimizer]:
        self._fetch_optimizers()
        return DDPStrategy.optimizers.fget(self)  # type: ignore[attr-defined,no-any-return]

    @optimizers.setter
    def optimizers(self, optimizers: list[Optimizer]) -> None:
        self.__dict__["_optimizers_source"] = None  # set here: what rank 0 keeps no longer applies
        DDPStrategy.optimizers.fset(self, optimizers)  # type: ignore[attr-defined]

    @property
    def lr_scheduler_configs(self) -> list[LRSchedulerConfig]:
        self._fetch_optimizers()
        configs: list[LRSchedulerConfig] = self.__dict__.get("lr_scheduler_configs", [])
        return configs

    @lr_scheduler_configs.setter
    def lr_scheduler_configs(self, configs: list[LRSchedulerConfig]) -> None:
        self.__dict__["lr_scheduler_configs"] = configs

    def _optimizers_from(self, source: OptimizersOnRanks | Unavailable | None) -> None:
        """Driver: the optimizers of the fit being launched (None: none yet) or just finished (where they are)."""
        self.optimizers = []
        self.lr_scheduler_configs = []
        self.__dict__["_optimizers_source"] = source

    def _fetch_optimizers(self) -> None:
        source = self.__dict__.get("_optimizers_source")
        if source is None or self.__dict__.get("_fetching"):
            return
        self.__dict__["_fetching"] = True  # reads while it runs (Lightning's own) see the lists as they are
        try:
            optimizers, configs, precision = source.fetch()
        finally:
            self.__dict__["_fetching"] = False
        self.optimizers = optimizers  # also drops the source: fetched once
        self.lr_scheduler_configs = configs
        self.precision_plugin.load_state_dict(precision)

    @override
    def teardown(self) -> None:
        # In the driver Lightning tears the strategy down after a call raised: a fit's optimizers
        # left on rank 0 stay there (fetching them now would move a model-sized state, or fail on
        # a broken pool, in the middle of the error).
        fetching = self.__dict__.get("_fetching", False)
        self.__dict__["_fetching"] = True
        try:
            super().teardown()
        finally:
            self.__dict__["_fetching"] = fetching

    # --- rank side -------------------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        return rank_device(self.parallel_devices, self.local_rank)

    @override
    def _setup_model(self, model: torch.nn.Module) -> Any:
        # Every rank unpickled the same bytes from the driver and nothing has written them since:
        # DDP's start-up broadcast of all parameters and buffers would copy equal values (and turn
        # shared copy-on-write pages of frozen weights into private copies on every rank).
        unchanged = getattr(self, "_sent_unchanged", None)
        ddp_kwargs = _compat.ddp_kwargs(self)
        if "init_sync" not in ddp_kwargs and unchanged is not None and unchanged(model):
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(
                module=model, device_ids=self.determine_ddp_device_ids(), init_sync=False, **ddp_kwargs
            )
        return super()._setup_model(model)

    @override
    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        if not dist.is_initialized():
            raise RuntimeError("PoolStrategy runs only inside a lightdist pool (torch.distributed is not set up)")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"the pool's process group has {dist.get_world_size()} ranks but the Trainer expects {self.world_size}"
            )
        _compat.set_process_group_backend(self, dist.get_backend())
        announce_group(self.global_rank, self.world_size, dist.get_backend())

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _compat.StrategyRegistryType) -> None:
        strategy_registry.register("lightdist", cls, description="DDP on a warm lightdist pool")


# model.optimizers() reads Lightning's private list of LightningOptimizer wrappers, not `optimizers`.
_compat.hook_lightning_optimizers(PoolStrategy, PoolStrategy._fetch_optimizers)


def _start(runner: DistributedRunner) -> None:
    """Start ``runner``, saying so: a pool's start takes seconds (every rank imports torch and
    Lightning), which would otherwise pass in silence before the first line of the fit.

    Said through Lightning's info logger, like its own "GPU available" lines: shown wherever those
    are (a terminal, a notebook, a log file of a batch job, where the seconds matter as much), and
    silenced by the same switch (``logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)``).
    """
    rank_zero_info(f"lightdist: starting {_layout(runner)}...")
    started = time.perf_counter()
    runner.start_sync()
    rank_zero_info(f"lightdist: {runner.world_size} ranks ready in {time.perf_counter() - started:.1f} s")


def _layout(runner: DistributedRunner) -> str:
    backend = runner.backend or {"cpu": "gloo", "cuda": "nccl"}.get(runner.accelerator)
    where = f" ({runner.accelerator}, {backend})" if backend else ""
    hosts = f" on {runner.nodes} hosts" if runner.nodes else ""
    return f"{runner.world_size} ranks{where}{hosts}"
