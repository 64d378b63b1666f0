"""A fit's optimizers and LR schedulers: kept on rank 0, brought to the driver only when asked for.

In-process, ``trainer.optimizers`` and ``trainer.lr_scheduler_configs`` hold the fit's optimizers
after ``fit`` (Adam's moments: twice the model's size), and ``trainer.save_checkpoint`` writes them
so that a resumed fit continues exactly. Copying them to the driver after every fit would cost a
model-sized transfer, and driver memory, per call that nobody may look at, so they stay where they
are:

* **rank 0** (:class:`KeptOptimizers`) keeps the fit's optimizers, schedulers and precision-plugin
  state (no copy: the objects the fit trained with, gradients dropped) under a token the driver
  chose for that fit. The next fit on the pool drops them before it builds its own, so a fit's peak
  memory does not grow; the other ranks keep nothing (DDP keeps their states equal to rank 0's).
* **the driver** (:class:`OptimizersOnRanks`) holds only the token. The first read of
  ``trainer.optimizers``, ``trainer.lr_scheduler_configs`` or ``model.optimizers()`` (and so
  ``trainer.save_checkpoint``) fetches them in one call: the state tensors come out of band (read
  from rank 0's memory, one copy), the optimizers are rebuilt over *your* model's parameters
  (matched by name) with ``load_state_dict``, the schedulers are unpickled pointing at them. Rank 0
  lets go of its copy then (a second, empty call gives its pages back): the state exists once, on
  rank 0 or in the driver.

Never stale: the token names one fit. When rank 0 no longer holds it (a later fit on the pool
replaced it, the pool was stopped or rank 0 replaced), the read raises ``RuntimeError`` saying so,
every time, instead of returning another fit's state or nothing. Optimizers that shard their state
(anything with ``consolidate_state_dict``, e.g. ``ZeroRedundancyOptimizer``) are not supported:
their state is not kept and the read raises. So does a fit on a server's pool (``server=``).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from lightdist.lightning import _refs

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch

    from lightdist.runner import DistributedRunner

__all__ = ["KeptOptimizers", "OptimizersOnRanks", "Unavailable"]

_SCHEDULERS_LIMIT = 64 << 20  # schedulers are small; a bigger pickle points at something it should not


# --- rank 0 --------------------------------------------------------------------------------------


class KeptOptimizers:
    """Rank 0's optimizers, LR scheduler configs and precision state of one fit, by token."""

    def __init__(self, token: str, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        self.token = token
        self.optimizers: list[torch.optim.Optimizer] = list(strategy.optimizers)
        self.configs = list(strategy.lr_scheduler_configs)
        self.precision = trainer.precision_plugin.state_dict()
        module = trainer.lightning_module
        names: dict[int, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), name)  # a tied weight: its first name, as state_dict() has it
        self.param_names = [
            [names.get(id(p)) for g in opt.param_groups for p in g["params"]] for opt in self.optimizers
        ]
        self.group_sizes = [[len(g["params"]) for g in opt.param_groups] for opt in self.optimizers]
        self.sharded = [type(o).__qualname__ for o in self.optimizers if hasattr(o, "consolidate_state_dict")]
        if self.sharded:
            self.optimizers, self.configs = [], []  # not supported: keep nothing (see the module docstring)
        # Weak: the scheduler's pickle names them if a closure reaches them; they must not be kept alive.
        self._trainer_ref = weakref.ref(trainer)
        self._module_ref = weakref.ref(module)
        for opt in self.optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    param.grad = None  # a model-sized buffer nobody reads after the fit

    def export(self) -> dict[str, Any]:
        """The state for the driver (tensors travel out of band); ``{"unsupported": why}`` if none."""
        if self.sharded:
            return {"unsupported": f"{', '.join(self.sharded)} shards its state over the ranks"}
        for i, names in enumerate(self.param_names):
            if None in names:
                return {"unsupported": f"optimizer {i} holds a tensor that is not a parameter of the LightningModule"}
        refs: dict[int, Any] = {id(opt): ("optimizer", i) for i, opt in enumerate(self.optimizers)}
        for label, ref in (("trainer", self._trainer_ref), ("module", self._module_ref)):
            obj = ref()
            if obj is not None:
                refs[id(obj)] = (label,)
        try:
            schedulers = _refs.dumps(self.configs, refs, _SCHEDULERS_LIMIT)
        except Exception as exc:  # noqa: BLE001 - said in the driver instead of a rank's traceback
            reason = "too large" if isinstance(exc, _refs.TooLarge) else f"{type(exc).__name__}: {exc}"
            return {"unsupported": f"its LR schedulers cannot be pickled ({reason})"}
        return {
            "optimizers": [
                {
                    "cls": type(opt),
                    "defaults": opt.defaults,
                    "names": names,
                    "group_sizes": sizes,
                    "state_dict": opt.state_dict(),
                }
                for opt, names, sizes in zip(self.optimizers, self.param_names, self.group_sizes)
            ],
            "schedulers": schedulers,
            "precision": self.precision,
        }


# --- the driver ----------------------------------------------------------------------------------


class Unavailable:
    """A fit whose optimizer state cannot be fetched (e.g. on a server's pool): reading raises ``why``."""

    def __init__(self, why: str) -> None:
        self.why = why

    def fetch(self) -> tuple[list[Any], list[Any], dict[str, Any]]:
        raise RuntimeError(self.why)


class OptimizersOnRanks:
    """The driver's handle on the state rank 0 keeps for one fit (see the module docstring)."""

    def __init__(self, runner: DistributedRunner, token: str, trainer: pl.Trainer, model: pl.LightningModule) -> None:
        self.runner = runner
        self.token = token
        # The fit's own model: a later validate(other_model) on the Trainer must not get its optimizers.
        self._trainer_ref = weakref.ref(trainer)
        self._model_ref = weakref.ref(model)

    def fetch(self) -> tuple[list[Any], list[Any], dict[str, Any]]:
        """``(optimizers, lr_scheduler_configs, precision_state)`` over the driver model's parameters."""
        trainer, model = self._trainer_ref(), self._model_ref()
        if trainer is None or model is None:
            raise RuntimeError(self._gone("the Trainer or model of that fit no longer exists"))
        if not self.runner.is_alive():
            raise RuntimeError(self._gone("its pool was stopped"))
        reply = self.runner.invoke_sync({"fetch_state": self.token})
        if reply is not None:
            # Read: rank 0 frees its copy as the next call arrives; this one gives the pages back.
            self.runner.invoke_sync({"release_state": True})
        if reply is None:
            raise RuntimeError(self._gone("a later fit on the same pool replaced it, or rank 0 was restarted"))
        if "unsupported" in reply:
            raise RuntimeError(
                f"the driver cannot hold this fit's optimizer state: {reply['unsupported']}. Save checkpoints with "
                "ModelCheckpoint (it runs on the ranks), or trainer.save_checkpoint(path, weights_only=True)"
            )
        params = dict(model.named_parameters(remove_duplicate=False))
        optimizers = [_rebuild(entry, params) for entry in reply["optimizers"]]
        names: dict[tuple[Any, ...], Any] = {("optimizer", i): opt for i, opt in enumerate(optimizers)}
        names[("trainer",)] = trainer
        names[("module",)] = model
        configs = _refs.loads(reply["schedulers"], names.__getitem__)
        return optimizers, configs, reply["precision"]

    def _gone(self, why: str) -> str:
        return (
            f"the optimizer and LR scheduler state of this Trainer's last fit is no longer on the pool ({why}). "
            "Read trainer.optimizers or call trainer.save_checkpoint() before the next fit on that pool, or "
            "save checkpoints during the fit with ModelCheckpoint"
        )


def _rebuild(entry: dict[str, Any], params: dict[str, torch.nn.Parameter]) -> Any:
    """An optimizer of rank 0's class over the driver's parameters, with rank 0's state.

    Built as unpickling builds one (``__setstate__``, no constructor arguments needed), then loaded
    with ``load_state_dict``: torch's own checks and its mapping of state to parameters. The state's
    tensors are the ones that arrived (same dtype and device: no copy)."""
    missing = [name for name in entry["names"] if name not in params]
    if missing:
        raise RuntimeError(
            f"the driver's model has no parameter {missing[0]!r}, which the fit's optimizer holds "
            "(did the model build layers on the ranks only? build them in __init__)"
        )
    it = iter(entry["names"])
    groups = [{"params": [params[next(it)] for _ in range(size)]} for size in entry["group_sizes"]]
    cls = entry["cls"]
    optimizer = cls.__new__(cls)
    optimizer.__setstate__({"defaults": entry["defaults"], "state": defaultdict(dict), "param_groups": groups})
    optimizer.load_state_dict(entry["state_dict"])
    return optimizer
