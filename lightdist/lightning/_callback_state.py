"""Callbacks' attributes: what a call changed on rank 0 comes back to the driver's callback objects.

Callbacks run on the ranks, on copies of the driver's callbacks. Their ``state_dict`` comes back
(the launcher loads it), but a callback without one, or an attribute outside it (a counter, a list
of values seen, ``EarlyStopping``'s flags), would keep in the driver the value it had before the
call, where an in-process Trainer's callback has the new one. So rank 0 notes each attribute of
each callback as the call received it (:class:`CallbackWatch`: a digest of its pickle) and after
the call sends back those that changed, pickled. :func:`apply` sets them on the driver's callbacks,
which are matched by position (the ranks' list is the driver's, minus progress bars, plus
lightdist's own, plus what ``configure_callbacks`` adds).

What does not come back, and why:

* an attribute that points at the Trainer, the model, the datamodule or the strategy (Lightning's
  ``callback.log``, a ``self.trainer = trainer``): the driver's callback keeps its own value; a
  copy of the rank's would be a second model, and a pointer kept in a callback would carry that
  model to the ranks with every later call that uses the callback. A pointer to another callback
  comes back as the driver's callback.
* an attribute whose pickle exceeds :data:`LIMIT` (1 MiB) or that cannot be pickled: the driver
  warns once per callback class and attribute, naming them (give the callback ``state_dict`` /
  ``load_state_dict`` for state that large; Lightning checkpoints it too).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Hashable
from typing import Any

from lightdist.lightning import _refs

__all__ = ["LIMIT", "CallbackWatch", "apply"]

LIMIT = 1 << 20
"""The largest attribute (pickled bytes) that comes back; larger ones cost a copy per call."""

_warned: set[tuple[str, str]] = set()
_SCALARS = frozenset({type(None), bool, int, float, str})
_OK, _NOT_SENT = "ok", "not sent"


class CallbackWatch:
    """Rank 0: the Trainer's callbacks as the call received them, and what the call changed."""

    def __init__(self, trainer: Any, arguments: dict[str, Any]) -> None:
        self.callbacks = list(trainer.callbacks)  # the driver's order
        self.pinned: list[Any] = []
        self.names: dict[int, Hashable] = {id(cb): ("callback", i) for i, cb in enumerate(self.callbacks)}
        self.refs = {**_references(trainer, arguments, self.pinned), **self.names}
        self.before = [
            {name: self._look(value, pickled=False)[0] for name, value in _attributes(cb).items()}
            for cb in self.callbacks
        ]

    def _look(self, value: Any, pickled: bool = True) -> tuple[tuple[Any, ...], bytes | str | None]:
        """``(what to compare, the pickle | why it cannot travel | None for a reference)``. A plain
        scalar compares by value (most attributes: cheap), and is pickled only when ``pickled``."""
        if type(value) in _SCALARS:
            return (type(value), value), _refs.dumps(value, {}, LIMIT) if pickled else None
        try:
            data = _refs.dumps(value, self.refs, LIMIT)
        except _refs.Refused:
            return ("ref",), None
        except _refs.TooLarge:
            return (_NOT_SENT, id(value)), f"larger than {LIMIT >> 20} MiB pickled"
        except Exception as exc:  # noqa: BLE001 - any pickling error: the attribute stays behind
            return (_NOT_SENT, id(value)), f"cannot be pickled: {type(exc).__name__}"
        return (_OK, hashlib.blake2b(data, digest_size=16).digest()), data

    def changes(self, trainer: Any) -> dict[int, dict[str, Any]]:
        """Per driver position: ``{"set": {name: pickle}, "deleted": [...], "left": {name: why}}``.
        Callbacks the call replaced (``configure_callbacks``) or that it does not run are skipped."""
        running = {id(cb) for cb in trainer.callbacks}
        # + what exists now (the DDP wrapper, callbacks only the ranks have); the driver's callbacks by name
        self.refs = {**self.refs, **_references(trainer, {}, self.pinned), **self.names}
        out: dict[int, dict[str, Any]] = {}
        for i, (cb, before) in enumerate(zip(self.callbacks, self.before)):
            if id(cb) not in running:
                continue
            attributes = _attributes(cb)
            change: dict[str, Any] = {"set": {}, "deleted": [k for k in before if k not in attributes], "left": {}}
            for name, value in attributes.items():
                seen, data = self._look(value, pickled=False)
                if seen == before.get(name) or seen == ("ref",):
                    continue  # unchanged; or a reference, which keeps the driver's own value
                if data is None:  # a scalar that changed
                    data = self._look(value)[1]
                if isinstance(data, bytes):
                    change["set"][name] = data
                elif isinstance(data, str):
                    change["left"][name] = data
            if any(change.values()):
                out[i] = change
        return out


def _attributes(callback: Any) -> dict[str, Any]:
    return getattr(callback, "__dict__", {})  # a class with __slots__ only has none to bring back


def _references(trainer: Any, arguments: dict[str, Any], pinned: list[Any]) -> dict[int, Hashable]:
    """What must not travel, by ``id``: the Trainer, its strategy, the model (and its DDP wrapper),
    the datamodule, the call's arguments, every callback (the driver's are named after). The
    objects are appended to ``pinned``: alive, so no ``id`` is reused meanwhile."""
    strategy = trainer.strategy
    objects = (trainer, strategy, strategy.lightning_module, strategy.model, trainer.datamodule, *trainer.callbacks)
    refs: dict[int, Hashable] = {}
    for obj in (*objects, *arguments.values()):
        if obj is not None and not isinstance(obj, (list, dict, tuple, str, int, float, bool)):
            refs[id(obj)] = _refs.REFUSE
            pinned.append(obj)
    return refs


def apply(trainer: Any, changes: dict[int, dict[str, Any]]) -> None:
    """Driver: set what the call changed on the driver's callbacks; warn once per attribute left behind."""
    callbacks = trainer.callbacks

    def resolve(name: tuple[Any, ...]) -> Any:
        return callbacks[name[1]]  # only the driver's callbacks travel by name (see CallbackWatch)

    for i, change in changes.items():
        if i >= len(callbacks):
            continue
        cb = callbacks[i]
        attributes = _attributes(cb)  # the instance's own dict, as on the rank (not through properties)
        for name, data in change["set"].items():
            attributes[name] = _refs.loads(data, resolve)
        for name in change["deleted"]:
            attributes.pop(name, None)
        for name, why in change["left"].items():
            key = (type(cb).__qualname__, name)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"{key[0]}.{name} changed on the ranks but stays at its value from before the call in the "
                    f"driver: it is {why}. Keep such state in the callback's state_dict()/load_state_dict() "
                    "(which come back to the driver), or read it on the ranks",
                    stacklevel=4,
                )
