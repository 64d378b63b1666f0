"""Job events: the API's names for the Lightning layer's progress events, and back.

The ranks' events (:mod:`lightdist.lightning.events`) are dicts with an ``"event"`` key; the API
names them as hosted fine-tuning APIs do (``run_start``/``run_end`` for a Trainer call, the rest
unchanged) and adds ``total_steps`` to training steps. Standard library only: the thin client and
the Python client map back with :func:`raw_event`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LIFECYCLE", "StepCounter", "api_event", "raw_event"]

_TO_API = {"start": "run_start", "end": "run_end"}
_TO_RAW = {v: k for k, v in _TO_API.items()}
# Fields the server adds to every event; not part of the Lightning event.
_ENVELOPE = ("type", "job_id", "time", "total_steps")
# The events the server itself writes about a job (see docs/server.md).
LIFECYCLE = ("queued", "started", "log", "interrupted", "finished")


def api_event(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(type, fields)`` of a Lightning-layer event, as stored and streamed by the server."""
    fields = {k: v for k, v in raw.items() if k != "event"}
    return _TO_API.get(raw["event"], raw["event"]), fields


def raw_event(data: dict[str, Any]) -> dict[str, Any]:
    """The Lightning-layer event an API event's ``data`` came from (for the progress bar and
    ``PoolStrategy(on_event=...)`` on the client side)."""
    fields = {k: v for k, v in data.items() if k not in _ENVELOPE}
    return {"event": _TO_RAW.get(data["type"], data["type"]), **fields}


class StepCounter:
    """``total_steps`` for a fit: ``max_steps`` when set, else epochs × batches per epoch (None until
    both are known, or when the Trainer does not know its epoch length)."""

    def __init__(self) -> None:
        self.max_steps: int | None = None
        self.max_epochs: int | None = None
        self.batches: int | None = None

    def see(self, raw: dict[str, Any]) -> int | None:
        kind = raw["event"]
        if kind == "start":
            self.max_steps = raw.get("max_steps") if (raw.get("max_steps") or -1) > 0 else None
            self.max_epochs = raw.get("max_epochs") if (raw.get("max_epochs") or -1) > 0 else None
        elif kind == "epoch_start":
            self.batches = raw.get("num_training_batches")
        if self.max_steps is not None:
            return self.max_steps
        if self.max_epochs is not None and self.batches is not None:
            return self.max_epochs * self.batches
        return None
