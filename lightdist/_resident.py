"""Models stay on the ranks: what the driver has already sent, and what each rank still holds.

A *resident* call (the Lightning layer makes every Trainer call one) names each storage it pickles
with a key. The driver's :class:`ResidentSet` remembers, per key, a fingerprint of its storage as
the ranks hold it; a storage whose fingerprint still matches is sent as a reference, and each rank's
:class:`RankCache` rebuilds the tensor on the storage it kept. Both sides keep exactly the storages
of the **last** resident call (a rank prunes the rest before the next call is unpickled), so a
sweep of new models holds one model at a time, never a growing pile.

The fingerprint is the tensor's version counter (bumped by every in-place write through autograd's
view of it: optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``), the storage's
address and size, and 64 bytes sampled across it, which catches most writes through ``.data``
(which bypass the version counter). After a call, rank 0 writes back what training changed
(trainable parameters, buffers whose bytes changed) into the driver's own storages, so the
driver's model equals rank 0's and nothing needs sending next time. Any failure, cancellation or
recovery bumps the *epoch*: the ranks drop their caches and everything is sent afresh.
"""

from __future__ import annotations

import gc
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

from lightdist._tensors import byte_view

if TYPE_CHECKING:
    import torch

    from lightdist._tensors import _Slot

__all__ = ["RankCache", "ResidentMissError", "ResidentSet"]

_SAMPLE = 64
_GC_AFTER_BYTES = 64 << 20  # pruning this much resident memory is worth a gc pass (~0.1 s)


class ResidentMissError(RuntimeError):
    """A rank was asked for a storage it does not hold (a bug in the bookkeeping: never expected)."""


def fingerprint(tensor: torch.Tensor, storage: torch.UntypedStorage) -> tuple[Any, ...]:
    n = storage.nbytes()
    sample = b""
    if n:
        step = max(1, n // _SAMPLE)
        sample = bytes(byte_view(storage)[::step][:_SAMPLE].tolist())
    return (tensor._version, storage.data_ptr(), n, sample)


def _written(tensor: Any, version: int) -> bool:
    return tensor is None or bool(tensor._version != version)  # gone: assume the worst


class ResidentSet:
    """Driver side, one per pool: which storages the ranks hold, as of the last resident call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # taken around encode + submit, so keys reach ranks in order
        self.epoch = 1
        self._ids = itertools.count(1)
        self._keys: dict[int, tuple[Any, int]] = {}  # storage cdata -> (StorageWeakRef, key)
        self._synced: dict[int, tuple[Any, ...]] = {}  # key -> fingerprint of what the ranks hold
        self._pending: list[tuple[int, _Slot]] = []  # the latest encoded call's storages
        self._serial = 0
        self._committed = 0  # the serial whose storages the ranks are known to hold

    @property
    def serial(self) -> int:
        """The serial of the latest call planned."""
        return self._serial

    def plan(self, slots: list[_Slot]) -> list[tuple[int, bool]]:
        """``(key, the ranks hold it unchanged)`` per slot; remembers the call as the latest."""
        from torch.multiprocessing.reductions import StorageWeakRef

        plan = []
        # Only a committed call says what the ranks hold: after an uncommitted one they hold its
        # storages, whatever _synced says, so nothing may be sent as a reference then.
        synced = self._synced if self._committed == self._serial else {}
        self._pending = []
        for slot in slots:
            entry = self._keys.get(slot.storage._cdata)
            if entry is None or entry[0].expired():
                weak = StorageWeakRef(slot.storage)  # type: ignore[no-untyped-call]
                entry = self._keys[slot.storage._cdata] = (weak, next(self._ids))
            key = entry[1]
            plan.append((key, synced.get(key) == fingerprint(slot.tensor, slot.storage)))
            self._pending.append((key, slot))
        self._serial += 1
        return plan

    def envelope(self, plan: list[tuple[int, bool]]) -> dict[str, Any]:
        return {"epoch": self.epoch, "keys": [key for key, _ in plan], "serial": self._serial}

    def target(self, serial: int, key: int) -> Any:
        """The driver's storage for ``key`` in call ``serial`` (None if that call is no longer the latest)."""
        if serial != self._serial:
            return None
        for k, slot in self._pending:
            if k == key:
                return slot.storage
        return None

    def apply(self, serial: int, writeback: dict[int, torch.Tensor]) -> list[int]:
        """Copy rank 0's changed storages into the driver's; returns keys that did not fit."""
        import torch

        refused = []
        for key, tensor in writeback.items():
            target = self.target(serial, key)
            source = tensor.untyped_storage()
            if target is None or target.nbytes() != source.nbytes():
                refused.append(key)
                continue
            if target.data_ptr() != source.data_ptr():  # not already read in place (vm transport)
                byte_view(target).copy_(byte_view(source))
        for key, slot in self._pending:
            if key in writeback:
                # A raw write does not bump the version counter: do it, so autograd and our own
                # fingerprint see the change.
                torch.autograd.graph.increment_version(slot.tensor)
        return refused

    def commit(self, serial: int, dropped: set[int]) -> None:
        """Call ``serial`` succeeded and its write-back is applied: the ranks hold its storages."""
        if serial != self._serial or self._committed == serial:
            return  # a later call was planned meanwhile (it will say what the ranks hold), or done twice
        self._committed = serial
        self._synced = {
            key: fingerprint(slot.tensor, slot.storage) for key, slot in self._pending if key not in dropped
        }
        from torch.multiprocessing.reductions import StorageWeakRef

        # Fresh entries: a storage adopted during the call (moved onto the memfd) is a new one.
        self._keys = {
            slot.storage._cdata: (StorageWeakRef(slot.storage), key)  # type: ignore[no-untyped-call]
            for key, slot in self._pending
        }
        self._pending = []

    def invalidate(self) -> None:
        """The ranks' copies are in doubt (a failure, a cancel, a recovery): send everything next time."""
        self.epoch += 1
        self._synced.clear()
        self._pending = []
        self._committed = 0


class RankCache:
    """Rank side: the storages of the last resident call, by key."""

    def __init__(self) -> None:
        self.epoch = 0
        self.collect_due = False  # a resident call ended: the rank runs gc after replying
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._reset_call()

    def _reset_call(self) -> None:
        self._index: dict[int, int] | None = None
        self._rebuilt: dict[int, list[tuple[weakref.ref[Any], int]]] = {}
        self._settled: dict[int, Any] = {}
        self._writeback: dict[int, Any] = {}

    def begin(self, envelope: dict[str, Any]) -> None:
        """Before unpickling a resident call: adopt its epoch and drop what it does not name."""
        if envelope["epoch"] != self.epoch:
            self.clear()
            self.epoch = envelope["epoch"]
        keep = set(envelope["keys"])
        freed = 0
        for key in [k for k in self._storages if k not in keep]:
            freed += self._storages.pop(key).nbytes()
        if freed >= _GC_AFTER_BYTES:
            gc.collect()  # the previous call's model may sit in reference cycles (trainer <-> module)
        self._reset_call()

    def get(self, key: int, nbytes: int) -> torch.UntypedStorage:
        storage = self._storages.get(key)
        if storage is None or storage.nbytes() != nbytes:
            raise ResidentMissError(
                f"this rank does not hold resident storage {key} ({nbytes} bytes); the pool resends "
                "everything after this error"
            )
        return storage

    def put(self, key: int, storage: torch.UntypedStorage) -> None:
        self._storages[key] = storage
        self._index = None

    def rebuilt(self, key: int | None, tensor: torch.Tensor) -> None:
        if key is not None:
            self._rebuilt.setdefault(key, []).append((weakref.ref(tensor), tensor._version))

    def key_of(self, tensor: torch.Tensor) -> int | None:
        """The key of the storage under ``tensor``, if it is one this call's payload was built on."""
        if self._index is None:
            self._index = {s._cdata: k for k, s in self._storages.items()}
        return self._index.get(tensor.untyped_storage()._cdata)

    def settle(self, key: int, tensor: torch.Tensor, write_back: bool) -> None:
        """The caller vouches that ``tensor`` now holds ``key``'s value (rank 0: send it back)."""
        self._settled[key] = tensor
        if write_back:
            self._writeback[key] = tensor

    def end(self) -> tuple[dict[int, Any], list[int]]:
        """After the call: ``(write-back tensors, keys dropped)``. A storage written during the call
        that nobody vouched for is dropped here, and the driver hears of it, so it resends it."""
        dropped = []
        for key, entries in self._rebuilt.items():
            if key in self._settled:
                self._storages[key] = self._settled[key].untyped_storage()
            elif any(_written(ref(), version) for ref, version in entries):
                self._storages.pop(key, None)
                dropped.append(key)
        writeback = self._writeback
        self._reset_call()
        return writeback, dropped

    def clear(self) -> None:
        self._storages.clear()
        self._reset_call()
