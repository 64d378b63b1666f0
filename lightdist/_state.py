"""The states of a driver's pool (see :class:`lightdist._pool.Pool`)."""

from __future__ import annotations

import enum

__all__ = ["PoolState"]


class PoolState(enum.Enum):
    """``STARTING`` → ``READY`` ⇄ ``RECOVERING``; any of them → ``BROKEN``; then ``STOPPING`` → ``CLOSED``.

    Calls run in ``READY``; they queue in ``RECOVERING``; they fail at once in every other state."""

    STARTING = "starting"
    READY = "ready"
    RECOVERING = "recovering"
    BROKEN = "broken"
    STOPPING = "stopping"
    CLOSED = "closed"

    @property
    def serving(self) -> bool:
        """Started and accepting calls (they may queue while the pool recovers)."""
        return self in (PoolState.READY, PoolState.RECOVERING)

    @property
    def over(self) -> bool:
        """No recovery or host bookkeeping applies any more."""
        return self in (PoolState.BROKEN, PoolState.STOPPING, PoolState.CLOSED)
