"""Pickling with references: what both sides already hold travels as a name, never by value.

Rank 0 sends the driver objects that point at the Trainer's other parts: an LR scheduler points at
its optimizer, a callback may keep the Trainer or the model. By value, such a pointer would drag a
copy of the rank's model (or Trainer) into the driver; the driver has its own, so the pointer
travels as a name (``("optimizer", 0)``, ``("module",)``) that the driver resolves to its own
object. A pointer to what must not travel at all raises :class:`Refused`. Every dump is capped:
past ``limit`` bytes it stops at once with :class:`TooLarge` (a tensor is checked before torch
serialises it), so asking whether something is cheap costs at most ``limit``.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Hashable
from typing import Any

import cloudpickle

__all__ = ["REFUSE", "Refused", "TooLarge", "dumps", "loads"]

REFUSE = ("refuse",)
"""The name for an object that must not travel (e.g. the rank's own Trainer)."""


class Refused(Exception):
    """The object points at something that must not travel (``refs`` maps it to :data:`REFUSE`)."""


class TooLarge(Exception):
    """The pickle would exceed its limit."""


class _Capped(io.BytesIO):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > self.limit:
            raise TooLarge
        return super().write(data)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def __init__(self, file: _Capped, refs: dict[int, Hashable]) -> None:
        super().__init__(file, protocol=5)
        self.refs = refs
        self.limit = file.limit

    def persistent_id(self, obj: Any) -> Hashable | None:
        name = self.refs.get(id(obj))
        if name == REFUSE:
            raise Refused
        return name

    def reducer_override(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, torch.Tensor):
            if obj.untyped_storage().nbytes() > self.limit:
                raise TooLarge  # before torch copies the whole storage into a bytes object
            if obj.device.type != "cpu":
                return _same, (obj.detach().cpu(),)  # the driver never initialises CUDA
        return super().reducer_override(obj)


def _same(value: Any) -> Any:
    return value


def dumps(obj: Any, refs: dict[int, Hashable], limit: int) -> bytes:
    """Pickle ``obj``; an object whose ``id`` is in ``refs`` travels as that name.

    Raises :class:`Refused` or :class:`TooLarge` (see the module docstring); anything that cannot
    be pickled raises as cloudpickle does."""
    file = _Capped(limit)
    _Pickler(file, refs).dump(obj)
    return file.getvalue()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, resolve: Callable[[Any], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self.resolve = resolve

    def persistent_load(self, pid: Any) -> Any:
        return self.resolve(tuple(pid))


def loads(data: bytes, resolve: Callable[[tuple[Any, ...]], Any]) -> Any:
    """Unpickle what :func:`dumps` made; ``resolve(name)`` gives this side's object for each name."""
    return _Unpickler(data, resolve).load()
