"""Where a pool's ranks run: the hosts behind :class:`~lightdist._procs.RankHost`, as the pool sees them.

A *placement* owns the hosts (this machine's template process, or the agents of other machines) and
knows which host runs which rank. It never calls into the pool: what happens on its hosts comes
back as :data:`PlacementEvent` values from :meth:`Placement.on_message` and :meth:`Placement.tick`,
and the pool acts on them. A single-host pool has a :class:`LocalPlacement`, which carries no
multi-host state; :class:`lightdist._attach.AgentPlacement` is the one for hosts attached by agents.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from lightdist._procs import RankExit, RankHost, TemplateProcess
from lightdist._state import PoolState
from lightdist.protocol import Message

__all__ = [
    "HostLost",
    "HostsMissing",
    "LocalPlacement",
    "Placement",
    "PlacementEvent",
    "PoolFailed",
    "RankExited",
    "SpawnRanks",
]


@dataclasses.dataclass(frozen=True)
class SpawnRanks:
    """These ranks have a host now (the pool formed, or a host took over lost ranks): start them."""

    ranks: list[int]


@dataclasses.dataclass(frozen=True)
class RankExited:
    info: RankExit


@dataclasses.dataclass(frozen=True)
class HostLost:
    """A host went silent or its template failed; its ranks are gone (``pids``: those that were alive)."""

    host: str
    ranks: list[int]
    pids: dict[int, int]
    why: str


@dataclasses.dataclass(frozen=True)
class HostsMissing:
    """A lost host's ranks found no other host in time: the calls waiting for them fail with
    ``error``, and so do later calls until a host takes them (:meth:`Placement.missing`)."""

    error: BaseException


@dataclasses.dataclass(frozen=True)
class PoolFailed:
    """The pool cannot go on (hosts of the wrong size, a host lost while starting)."""

    error: BaseException


PlacementEvent = SpawnRanks | RankExited | HostLost | HostsMissing | PoolFailed


class Placement(Protocol):
    def host_of(self, rank: int) -> RankHost | None: ...
    def hosts(self) -> list[RankHost]: ...
    def host_ranks(self) -> dict[str, list[int]]: ...
    def formed(self) -> bool: ...
    def claim(self, ranks: list[int]) -> None: ...
    def on_message(self, msg: Message, state: PoolState) -> list[PlacementEvent]: ...
    def tick(self, now: float, state: PoolState) -> tuple[list[PlacementEvent], float | None]: ...
    def probe(self) -> float:
        """Ask every host that runs ranks for a sign of life now; returns how long a silent one may
        take to be declared lost (0: there is nothing to ask). See :meth:`probed`."""
        ...

    def probed(self) -> bool:
        """Every host asked by the last :meth:`probe` answered, or was declared lost."""
        ...

    def missing(self) -> BaseException | None:
        """Why calls cannot run now: a lost host's ranks have waited too long for another host."""
        ...

    def closing(self, failure: str | None) -> None:
        """The pool is about to close its hosts: stopped (None) or ended by ``failure``."""
        ...

    def status(self) -> str: ...
    def close_linger_ms(self) -> int: ...


class LocalPlacement:
    """Every rank on this machine, forked by one template process (started by :meth:`start`)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.template: TemplateProcess | None = None

    def start(self, template: TemplateProcess) -> None:
        self.template = template

    def host_of(self, rank: int) -> RankHost | None:
        return self.template

    def hosts(self) -> list[RankHost]:
        return [] if self.template is None else [self.template]

    def host_ranks(self) -> dict[str, list[int]]:
        return {} if self.template is None else {self.template.name: list(range(self.world_size))}

    def formed(self) -> bool:
        return self.template is not None

    def claim(self, ranks: list[int]) -> None:
        pass  # the template hosts every rank

    def on_message(self, msg: Message, state: PoolState) -> list[PlacementEvent]:
        return []  # no agents here (the session refuses their names)

    def tick(self, now: float, state: PoolState) -> tuple[list[PlacementEvent], float | None]:
        return [], None

    def probe(self) -> float:
        return 0.0  # the template's monitor reports a death within milliseconds: nothing to ask

    def probed(self) -> bool:
        return True

    def missing(self) -> BaseException | None:
        return None  # the template respawns every rank

    def closing(self, failure: str | None) -> None:
        pass

    def status(self) -> str:
        return "one host (this machine)"

    def close_linger_ms(self) -> int:
        return 0
