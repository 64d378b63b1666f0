"""Which agent is which host, in a pool across hosts (driver side, used by :mod:`lightdist._attach`).

A host's name (``lightdist agent --host-name``, by default the machine's hostname) is its identity:
``runner.hosts`` is keyed by it, ``host_names=`` waits for it, and a host that comes back after a
loss gets its ranks back under it. So two live agents never share a name:

* A HELLO with a name that an attached agent holds is a *claim*. The newcomer is not attached yet;
  the holder decides. If the holder speaks after the claim arrived (it answers the heartbeat within
  a quarter of ``host_timeout``), it is alive and the newcomer is **refused** (REFUSED: it exits 2
  saying which agent holds the name). If the holder is declared lost first (it crashed, froze or
  left), the newcomer is **admitted** in its place: this is a restarted agent, which a launcher
  (Kubernetes, torchrun, srun) starts under the same name, often before the heartbeat missed the
  old one.
* Ranks of a lost host go back to the host that returns under its name, else to a spare whose
  launcher node index matches theirs, else to the first spare with room (:func:`successors`). A
  torchrun restart therefore brings every rank back to its old place, not to whichever worker
  attached first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["Claim", "Host", "NameClaims", "refusal", "successors"]


class Host(Protocol):
    name: str
    nproc: int
    facts: dict[str, Any]


H = TypeVar("H", bound="Host")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A newcomer's HELLO for a name a live agent holds: its sender, facts, and when it arrived."""

    sender: str
    facts: dict[str, Any]
    since: float


class NameClaims:
    """Claims waiting for the agent that holds their name to speak (refuse) or be lost (admit)."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, Claim]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def hold(self, name: str, sender: str, facts: dict[str, Any], now: float) -> None:
        """Note a claim (a newcomer re-sends HELLO every 2 s: its first arrival counts)."""
        claims = self._by_name.setdefault(name, {})
        if sender not in claims:
            claims[sender] = Claim(sender, facts, now)

    def refuted(self, name: str, heard_at: float) -> list[Claim]:
        """The holder of ``name`` spoke at ``heard_at``: the claims that arrived before are refused."""
        claims = self._by_name.get(name, {})
        out = [claim for claim in claims.values() if claim.since < heard_at]
        for claim in out:
            del claims[claim.sender]
        if not claims:
            self._by_name.pop(name, None)
        return out

    def vacated(self, name: str) -> Claim | None:
        """The holder of ``name`` is gone: the first claim takes its place (others claim again)."""
        claims = self._by_name.get(name)
        if not claims:
            return None
        first = min(claims.values(), key=lambda claim: claim.since)
        del claims[first.sender]
        if not claims:
            del self._by_name[name]
        return first


def refusal(name: str, holder: Host) -> str:
    """Why a newcomer was refused, in words for the operator who started it."""
    where = f"pid {holder.facts.get('pid', '?')} at {holder.facts.get('ip', '?')}"
    return (
        f"host name {name!r} is taken by a live agent ({where}); give every agent its own --host-name "
        "(two agents on one machine, or pods that share a host name)"
    )


def successors(groups: Sequence[tuple[list[int], str]], spares: Sequence[H]) -> list[tuple[int, H]]:
    """Which spare takes over which lost group (``(ranks, name of the lost host)``), as ``(group
    index, spare)`` pairs: the lost host itself, come back under its name, first; then a spare whose
    launcher node index is the group's node; then any spare with room, in arrival order. A spare that
    is some group's own host is never handed another group first (a torchrun restart brings every
    worker back to its own rank, whichever attaches first)."""
    free = list(spares)
    waiting = list(range(len(groups)))
    pairs: list[tuple[int, H]] = []

    def node(i: int) -> int:
        ranks = groups[i][0]
        return ranks[0] // len(ranks)

    for matches in (
        lambda i, host: host.name == groups[i][1],
        lambda i, host: host.facts.get("node_hint") == node(i),
        lambda i, host: True,
    ):
        for i in list(waiting):
            host = next((h for h in free if h.nproc >= len(groups[i][0]) and matches(i, h)), None)
            if host is not None:
                pairs.append((i, host))
                free.remove(host)
                waiting.remove(i)
    return pairs
