"""Ranks of lost hosts waiting for another host to take them (a pool across hosts, driver side).

When a host is lost, its ranks wait as a group for a host with room for them: a spare (an agent
that attached beyond the expected count) or an agent started after the loss. Calls queue meanwhile,
but not for ever: after ``timeout`` seconds (``rehost_timeout``) the group is *overdue*, and calls
fail at once with a message naming the lost host and what to start, until a host takes the group.

Like :class:`lightdist._recovery.Recovery`, :class:`Homeless` holds the state and decides; it
sends nothing. :class:`lightdist._attach.AgentPlacement` acts on what it returns.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TypeVar

from lightdist._identity import Host, successors

__all__ = ["Homeless", "LostGroup", "span"]

H = TypeVar("H", bound=Host)


@dataclasses.dataclass
class LostGroup:
    """The ranks of one lost host."""

    host: str
    ranks: list[int]
    since: float
    why: str
    overdue: bool = False  # waited past the timeout: calls fail (see Homeless.missing)


class Homeless:
    """Lost hosts' rank groups, oldest first; ``timeout``: how long each waits before calls fail."""

    def __init__(self, timeout: float, address: str) -> None:
        self.timeout = timeout
        self.address = address  # where a new agent connects, for the message
        self.groups: list[LostGroup] = []

    def add(self, host: str, ranks: list[int], why: str) -> None:
        self.groups.append(LostGroup(host, list(ranks), time.monotonic(), why))

    def ranks(self) -> list[int]:
        return sorted(rank for group in self.groups for rank in group.ranks)

    def place(self, spares: list[H]) -> list[tuple[LostGroup, H]]:
        """Pair groups with spares (:func:`lightdist._identity.successors`: the lost host itself
        come back under its name, then by launcher hint, then any with room); the spares paired are
        taken off ``spares`` and the groups off the waiting list."""
        pairs = successors([(group.ranks, group.host) for group in self.groups], spares)
        placed = [(self.groups[index], spare) for index, spare in pairs]
        for group, spare in placed:
            spares.remove(spare)
            self.groups.remove(group)
        return placed

    def expire(self, now: float) -> tuple[list[str], float | None]:
        """Groups that waited past the timeout just now: a message for each (the calls waiting for
        them fail with it); and when the next group is due (None: none waits)."""
        expired: list[str] = []
        due: float | None = None
        for group in self.groups:
            if group.overdue:
                continue
            if now < group.since + self.timeout:
                due = group.since + self.timeout if due is None else min(due, group.since + self.timeout)
            else:
                group.overdue = True
                expired.append(self._text([group]))
        return expired, due

    def missing(self) -> str | None:
        """Why calls cannot run now (some group is overdue), or None."""
        overdue = [group for group in self.groups if group.overdue]
        return self._text(overdue) if overdue else None

    def _text(self, groups: list[LostGroup]) -> str:
        lost = "; ".join(f"host {group.host} ({span(group.ranks)}) was lost: {group.why}" for group in groups)
        return (
            f"{lost}; no other host attached within {self.timeout:.0f} s (rehost_timeout) to take its ranks: "
            f"start 'lightdist agent --connect {self.address} --key-file ... --nproc-per-node "
            f"{len(groups[0].ranks)}' on a host (the pool resumes once it attached), or call start() again"
        )


def span(ranks: list[int]) -> str:
    """``rank 2``, ``ranks 2-3`` (a contiguous range) or ``ranks 2, 5``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))
