"""The rank side of the Lightning layer: runs one Trainer entry point per call.

``TrainerWorker`` receives the Trainer and its entry point (the bound method Lightning hands to the
launcher, see :data:`lightdist.lightning._compat.ENTRY_POINTS`) pickled together, so
``function.__self__ is trainer`` holds here as in the driver, runs it on the rank's main thread
with its arguments by name, and sends back what the driver needs to look as if it had run the Trainer
itself (rank 0 only; every rank takes part in the collectives that gathering needs).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightdist._output_state import OutputState, applied
from lightdist._shm import trim_heap
from lightdist.lightning import _compat
from lightdist.lightning._callback_state import CallbackWatch
from lightdist.lightning._optimizer_state import KeptOptimizers
from lightdist.lightning.events import EventStreamer
from lightdist.worker import DistributedWorker

__all__ = ["CancelledByCaller", "TrainerWorker", "announce_group"]


class TrainerWorker(DistributedWorker):
    """Pool worker for :class:`~lightdist.lightning.PoolStrategy` (one Trainer call per ``invoke``).

    A fit sent with ``keep_state=TOKEN`` leaves its optimizers on rank 0 under that token until the
    next fit (``keep_state=""``: keep none); a call with ``fetch_state=TOKEN`` hands them to the
    driver, and the next one, ``release_state=True``, returns their memory (see
    :mod:`lightdist.lightning._optimizer_state`).
    """

    _kept: KeptOptimizers | None = None

    def __call__(
        self,
        streaming: bool = False,
        job: tuple[Any, ...] = (),
        env: dict[str, str | None] | None = None,
        flags: dict[str, Any] | None = None,
        run: Callable[[DistributedWorker], Any] | None = None,
        keep_state: str | None = None,
        fetch_state: str | None = None,
        release_state: bool = False,
        output: OutputState | None = None,
    ) -> Any:
        if fetch_state is not None:
            return self._hand_over(fetch_state)
        if release_state:
            # The state rank 0 handed over was freed as this call arrived (a reply's tensors live
            # until the rank's next command): give its pages back, or glibc keeps them resident.
            if self.rank == 0:
                gc.collect()
                trim_heap()
            return None
        if keep_state is not None:
            self._kept = None  # before this fit builds its own: a fit's peak holds one optimizer state
        # Lightning's rank-zero output asks rank_zero_only.rank, which every rank inherited as 0 from
        # the template's import and which the strategy sets only mid-call: the checks that run
        # before (e.g. "no validation_step") would warn from every rank.
        rank_zero_only.rank = self.rank  # type: ignore[attr-defined]
        with applied(output):  # the driver's warning filters, loggers and terminal (see _output_state)
            _apply_env(env or {})
            _apply_flags(flags or {})
            if run is not None:  # another front end on the same ranks, e.g. Fabric(strategy="lightdist")
                return run(self)
            return self._run(streaming, job, keep_state)

    def _run(self, streaming: bool, job: tuple[Any, ...], keep_state: str | None) -> dict[str, Any] | None:
        trainer, function, arguments = job
        watch = CallbackWatch(trainer, arguments) if self.rank == 0 else None
        tracker = _ModelTracker(self._resident, _model_arg(trainer, arguments), self.rank)
        trainer.strategy._sent_unchanged = tracker.unchanged  # lets DDP skip its start-up broadcast
        # This rank's copy of the Trainer: the driver draws the one progress bar from rank 0's events.
        trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, ProgressBar)]
        trainer.callbacks.append(_StopWhenCancelled(self))
        if streaming and self.rank == 0:
            trainer.callbacks.append(EventStreamer(self))
        try:
            results = function(**arguments)  # by name: see _compat.entry_point_kwargs
        except CancelledByCaller as exc:
            # Every rank stopped at the same batch: finish like an interrupted in-process run
            # (on_exception hooks, teardown) and send back the state reached so far.
            _compat.handle_interrupt(trainer, exc)
            _compat.teardown(trainer)
            results = None
        except BaseException as exc:
            # The launcher calls the entry point directly, so Lightning's own cleanup around the
            # launcher does not run here: on_exception hooks, strategy cleanup, loggers finalised
            # as "failed", model to CPU. Run it before the error goes back.
            _compat.handle_interrupt(trainer, exc)
            _compat.teardown(trainer)
            raise
        out = _collect(trainer, results, self.rank, tracker, watch)
        if keep_state and self.rank == 0:
            self._kept = KeptOptimizers(keep_state, trainer)
        return out

    def _hand_over(self, token: str) -> dict[str, Any] | None:
        """Rank 0: the kept state of fit ``token`` for the driver (None when not held), then let it go:
        the reply keeps its tensors alive until the driver has read them."""
        kept = self._kept
        if self.rank != 0 or kept is None or kept.token != token:
            return None
        self._kept = None
        return kept.export()

    def on_process_group_rebuilt(self) -> None:
        global _group_announced
        _group_announced = False  # a new group: Lightning's lines of it at the next call


# In a rank: whether Lightning's lines of the current process group were printed (announce_group).
_group_announced = False


def announce_group(global_rank: int, world_size: int, backend: str) -> None:
    """Lightning's lines of a new process group, at the first Trainer call on it.

    A DDP script prints them when its first fit initialises the group; a pool's group was made at
    its start, so Lightning never prints them on a rank. Same text and loggers as Lightning's, so
    the same logging settings show or silence them; once per group, as a later fit of a DDP script
    does not print them again (a group rebuilt after a failure is a new group: printed again)."""
    global _group_announced
    if _group_announced:
        return
    _group_announced = True
    logging.getLogger("lightning.fabric.utilities.distributed").info(
        f"Initializing distributed: GLOBAL_RANK: {global_rank}, MEMBER: {global_rank + 1}/{world_size}"
    )
    rank_zero_info(
        f"{'-' * 100}\ndistributed_backend={backend}\n"
        f"All distributed processes registered. Starting with {world_size} processes\n{'-' * 100}\n"
    )


class CancelledByCaller(Exception):
    """Raised on every rank, at the same batch, when the caller cancelled (Ctrl-C, timeout)."""


class _StopWhenCancelled(Callback):
    """Stops every rank at the same batch once the caller cancels, keeping the pool warm.

    ``worker.cancelled`` turns true on each rank at a slightly different moment, and a rank that
    stopped alone would leave the others waiting in DDP's all-reduce. So the ranks agree: every
    ``interval`` batches (chosen from the measured step time so the check costs about one tiny
    all-reduce per 0.25 s, and the same on every rank) they all-reduce the flag, and all stop
    at that batch if any rank was cancelled.
    """

    CALIBRATION_BATCHES = 5
    CHECK_EVERY_S = 0.25

    def __init__(self, worker: DistributedWorker) -> None:
        self.worker = worker
        self.batches = 0
        self.interval = 1
        self.started = 0.0

    def _on_batch_end(self, trainer: Any) -> None:
        import time

        import torch.distributed as dist

        self.batches += 1
        if self.batches == 1:
            self.started = time.perf_counter()
        if self.batches == self.CALIBRATION_BATCHES:
            per_batch = torch.tensor(
                [(time.perf_counter() - self.started) / (self.batches - 1)], device=trainer.strategy.root_device
            )
            dist.all_reduce(per_batch, op=dist.ReduceOp.MAX)
            self.interval = max(1, min(1000, int(self.CHECK_EVERY_S / max(per_batch.item(), 1e-6))))
        # Every batch until calibrated (a slow model's first batches may take minutes each), then
        # every `interval`; all ranks count the same batches, so they all-reduce at the same ones.
        if self.batches <= self.CALIBRATION_BATCHES or self.batches % self.interval == 0:
            flag = torch.tensor([1 if self.worker.cancelled else 0], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                raise CancelledByCaller("the caller cancelled this call")

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._on_batch_end(trainer)

    def on_validation_batch_end(self, trainer: Any, *args: Any) -> None:
        self._on_batch_end(trainer)

    def on_test_batch_end(self, trainer: Any, *args: Any) -> None:
        self._on_batch_end(trainer)

    def on_predict_batch_end(self, trainer: Any, *args: Any) -> None:
        # Not a collective check: predict shards without padding (UnrepeatedDistributedSampler), so
        # ranks may run different numbers of batches and an all-reduce would wait for a rank that
        # has finished. Predict steps meet in no collective, so each rank can stop on its own; the
        # ranks meet again in the gather of predictions after the loop.
        if self.worker.cancelled:
            raise CancelledByCaller("the caller cancelled this call")


def _apply_env(env: dict[str, str | None]) -> None:
    # Seeds travel per call; a variable the driver does not have is removed here, or an earlier
    # call's seed would silently re-seed a later one in this warm process.
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _apply_flags(flags: dict[str, Any]) -> None:
    if "deterministic" in flags:
        torch.use_deterministic_algorithms(flags["deterministic"], warn_only=flags["deterministic_warn_only"])
    if "cudnn_benchmark" in flags:
        torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    if "matmul_precision" in flags:
        torch.set_float32_matmul_precision(flags["matmul_precision"])
    if "default_dtype" in flags:
        torch.set_default_dtype(flags["default_dtype"])


def _collect(
    trainer: Any, results: Any, rank: int, tracker: _ModelTracker, watch: CallbackWatch | None
) -> dict[str, Any] | None:
    module = trainer.lightning_module
    created = tracker.finish(module)  # on every rank: metrics inside the module may sync
    if trainer.state.fn == TrainerFn.PREDICTING and _all_finished(trainer, results is not None):
        results = _gather_predictions(trainer, results, rank)  # a collective: every rank
    elif trainer.state.fn == TrainerFn.PREDICTING:
        results = None  # some rank stopped early (cancelled): nothing to gather on any rank
    if rank != 0:
        return None
    out: dict[str, Any] = {
        "results": _to_cpu(results),
        "state": trainer.state,
        "callback_metrics": _to_cpu(dict(trainer.callback_metrics)),
        "logged_metrics": _to_cpu(dict(trainer.logged_metrics)),
        "progress_bar_metrics": _to_cpu(dict(trainer.progress_bar_metrics)),
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
        "callback_attributes": watch.changes(trainer) if watch is not None else {},
        "weights": None,
        "fit_loop": None,
    }
    if trainer.state.fn == TrainerFn.FITTING:
        out["weights"] = created
        out["fit_loop"] = trainer.fit_loop.state_dict()
        out["should_stop"] = trainer.should_stop
    return out


def _model_arg(trainer: Any, arguments: dict[str, Any]) -> Any:
    from lightning.pytorch import LightningModule

    model = _compat.entry_point_model(arguments)
    if isinstance(model, LightningModule):
        return model
    return trainer.strategy.lightning_module  # validate/test/predict(model=None) after a fit


class _ModelTracker:
    """Which of the model's tensors came from the driver (resident keys), and what changed.

    After the call every rank vouches for its model's tensors (DDP keeps ranks equal), so they stay
    resident; rank 0 marks for write-back the trainable parameters that changed and the buffers
    whose bytes changed. Frozen parameters never travel back (DDP's start-up broadcast rewrites
    them with equal values, so their version counter says nothing). Entries the driver never sent
    (created on the ranks) are returned by value from rank 0.
    """

    def __init__(self, cache: Any, module: Any, rank: int) -> None:
        self.cache = cache
        self.rank = rank
        self.start: dict[str, tuple[int, int, int, bytes | None]] = {}
        self.sent: dict[str, tuple[int, int]] = {}  # every parameter and buffer from the driver: (cdata, version)
        if cache is None or module is None:
            return
        for name, tensor in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]:
            if cache.key_of(tensor) is not None:
                self.sent[name] = (tensor.untyped_storage()._cdata, tensor._version)
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = cache.key_of(tensor)
            if key is not None:
                digest = _digest(tensor) if rank == 0 and not isinstance(tensor, torch.nn.Parameter) else None
                self.start[name] = (key, tensor._version, tensor.untyped_storage()._cdata, digest)

    def unchanged(self, module: Any) -> bool:
        """Whether every parameter and buffer of ``module`` is still the storage the driver sent,
        unwritten: then every rank holds the same bytes, and DDP's start-up broadcast is redundant."""
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        return bool(named) and all(
            self.sent.get(name) == (tensor.untyped_storage()._cdata, tensor._version) for name, tensor in named
        )

    def finish(self, module: Any) -> dict[str, Any]:
        """Settle the resident keys; rank 0: the entries created on the ranks, on CPU."""
        created: dict[str, Any] = {}
        params = dict(module.named_parameters(remove_duplicate=False))
        for name, tensor in module.state_dict(keep_vars=True).items():
            tensor = tensor.detach() if tensor.device.type == "cpu" else tensor.detach().cpu()
            start = self.start.get(name)
            if start is None:
                if self.rank == 0:
                    created[name] = tensor
                continue
            key, version, cdata, digest = start
            param = params.get(name)
            if param is not None:
                moved = tensor.untyped_storage()._cdata != cdata
                changed = param.requires_grad and (param._version != version or moved)
            else:
                changed = digest is not None and _digest(tensor) != digest
            self.cache.settle(key, tensor, write_back=self.rank == 0 and changed)
        return created


def _digest(tensor: Any) -> bytes:
    import hashlib

    from lightdist._tensors import _buffer

    data = tensor.detach().cpu().contiguous()
    return hashlib.blake2b(_buffer(data.untyped_storage()), digest_size=16).digest()


def _to_cpu(value: Any) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(value, torch.device("cpu"))


def _all_finished(trainer: Any, finished: bool) -> bool:
    """Whether every rank's predict loop ran to its end. A cancel stops each rank on its own in
    predict (see _StopWhenCancelled), so they must agree before the gather, or a rank that finished
    would wait in it for one that stopped."""
    import torch.distributed as dist

    flag = torch.tensor([0 if finished else 1], device=trainer.strategy.root_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not flag.item()


def _gather_predictions(trainer: Any, results: Any, rank: int) -> Any:
    """All ranks' predictions on rank 0, per sample in dataset order, batched as the loader batches.

    A DistributedSampler gives rank r the samples r, r + world_size, ... (padded with repeats), so
    rank 0's batches alone are neither complete nor in order. Lightning records each batch's
    dataset indices (:func:`~lightdist.lightning._compat.seen_batch_indices`); with them every
    output is split per sample, duplicates from padding are dropped, and the samples are re-batched
    in dataset order, which is what a single-process ``predict`` returns.
    """
    import torch.distributed as dist

    loaders = _compat.predict_loaders(trainer)
    indices = [_compat.seen_batch_indices(dl) for dl in loaders]
    per_loader = results if len(loaders) > 1 else [results]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (indices, _to_cpu(per_loader)))
    if rank != 0:
        return None
    merged = []
    for d, loader in enumerate(loaders):
        batches = [
            (idx, out) for rank_indices, rank_outputs in gathered for idx, out in zip(rank_indices[d], rank_outputs[d])
        ]
        # Lightning rebuilds the loader around a batch sampler, so its own batch_size is None.
        batch_size = getattr(loader.batch_sampler, "batch_size", None) or loader.batch_size or 1
        merged.append(_in_dataset_order(batches, batch_size))
    return merged if len(loaders) > 1 else merged[0]


def _in_dataset_order(batches: list[tuple[list[int], Any]], batch_size: int) -> list[Any]:
    """Every rank's batches as one list of batches in dataset order, padding repeats dropped.

    Two output shapes can be split per sample: (nested) tensors batched along dim 0, and a list
    with one item per sample (``[{"label": ..., "text": ...}, ...]``, as recipes return). Anything
    else comes back batch by batch, ordered by each batch's first sample.
    """
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if all(isinstance(out, list) and len(out) == len(idx) for idx, out in batches):
        items: dict[int, Any] = {}
        for idx, out in batches:
            for sample_index, item in zip(idx, out):
                items.setdefault(sample_index, item)  # first occurrence wins: the sampler pads with repeats
        order = sorted(items)
        return [[items[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    samples: dict[int, Any] = {}
    for idx, out in batches:
        leaves, spec = tree_flatten(out)
        if not leaves or not all(isinstance(x, torch.Tensor) and x.dim() > 0 and len(x) == len(idx) for x in leaves):
            import warnings

            warnings.warn(
                "predict outputs are neither tensors batched along dim 0 nor lists with one item per sample, "
                "so they cannot be put back in dataset order sample by sample; returning all ranks' batches "
                "ordered by their first sample",
                stacklevel=2,
            )
            return [out for idx, out in sorted(batches, key=lambda b: b[0][0] if b[0] else 0)]
        for i, sample_index in enumerate(idx):
            # First occurrence wins: DistributedSampler pads the last shard with repeats.
            samples.setdefault(sample_index, (spec, [leaf[i : i + 1] for leaf in leaves]))
    order = sorted(samples)
    out_batches = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start : start + batch_size]]
        spec = chunk[0][0]
        leaves = [torch.cat([leaf_parts[j] for _, leaf_parts in chunk]) for j in range(len(chunk[0][1]))]
        out_batches.append(tree_unflatten(leaves, spec))
    return out_batches
