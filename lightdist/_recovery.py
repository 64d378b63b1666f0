"""Recovery bookkeeping of a pool: which ranks were lost, and the episode that brings them back.

The rule: recovery starts only once no live rank is inside a call. A failed call gives the ranks
still running it ``grace_period`` seconds (they see ``cancelled``); ranks still inside it then are
wedged (in a collective whose peer failed: gloo cannot abort) and are killed. When the call is over,
lost ranks are respawned (``setup`` runs again with the original kwargs) and the others leave their
process group and join a fresh one under a new store prefix, keeping their ``setup`` state.

:class:`Recovery` holds the state and decides; it sends nothing and spawns nothing. Its methods
return what the pool must do (a :class:`Rebuild`), and the pool does it, under its lock.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

__all__ = ["MAX_RECOVERY_RESTARTS", "Rebuild", "Recovery", "store_prefix"]

MAX_RECOVERY_RESTARTS = 3  # ranks dying again while recovery restarts them: give up after this many


def store_prefix(generation: int) -> str:
    """The store namespace of one process-group generation. The TCPStore has no authentication: any
    local user can connect to it. A prefix it cannot guess (128 random bits, sent to the ranks only
    in signed messages) keeps such a client from reading the ranks' addresses or pre-writing the
    keys of the next generation, which broke recovery when the prefix was ``pg<generation>``."""
    return f"pg{generation}.{secrets.token_hex(16)}"


@dataclasses.dataclass(frozen=True)
class Rebuild:
    """One recovery step: kill ``kill``, send REBUILD to ``survivors`` (join ``store_prefix``),
    respawn ``respawn``."""

    generation: int
    store_prefix: str
    survivors: list[int]
    respawn: list[int]
    kill: list[int]


class Recovery:
    """Lost ranks and the current recovery episode of a pool of ``world_size`` ranks."""

    def __init__(self, world_size: int, timeout: float) -> None:
        self.world_size = world_size
        self.timeout = timeout  # an episode not done by then breaks the pool (the start() timeout)
        self.generation = 0  # of the process group; REBUILT replies name the one they joined
        self.store_prefix = store_prefix(0)
        self.dead: set[int] = set()  # ranks lost since the last recovery (died or killed)
        self.pending: set[int] = set()  # ranks that have not reported back in this episode
        self.deadline: float | None = None
        self.count = 0  # episodes so far
        self.last_seconds: float | None = None
        self._started = 0.0
        self._restarts = 0

    def lost(self, ranks: set[int]) -> None:
        self.dead |= ranks

    def begin(self, again: bool = False, counted: bool = True) -> Rebuild | None:
        """Start an episode (``again``: a rank died while one was running, so start every rank
        afresh; ``counted``: towards the cap, which a lost host is not). None: ranks kept dying
        while they were restarted; give up."""
        kill: list[int] = []
        if again:
            self._restarts += counted
            if self._restarts > MAX_RECOVERY_RESTARTS:
                return None
            kill = sorted(set(range(self.world_size)) - self.dead)
            self.dead = set(range(self.world_size))
        else:
            self._restarts = 0
        self.count += 1
        self.generation += 1
        self.store_prefix = store_prefix(self.generation)
        self._started = time.monotonic()
        self.deadline = self._started + self.timeout
        self.pending = set(range(self.world_size))
        lost, self.dead = self.dead, set()
        survivors = sorted(set(range(self.world_size)) - lost)
        return Rebuild(self.generation, self.store_prefix, survivors, sorted(lost), kill)

    def reported(self, rank: int) -> bool:
        """``rank`` is back (READY or REBUILT); True when it was the last one."""
        self.pending.discard(rank)
        if self.pending or self.deadline is None:
            return False
        self.deadline = None
        self.last_seconds = time.monotonic() - self._started
        return True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def abandon(self) -> None:
        self.deadline = None
