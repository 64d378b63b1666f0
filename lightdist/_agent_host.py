"""The driver's handle on one attached host: its agent, behind the :class:`~lightdist._procs.RankHost`
interface. Its methods are messages to the agent (ASSIGN, SPAWN, KILL, PING, EXIT); its ``pids``
follow the agent's HOST_EVENTs, and its ranks' output, forwarded by the agent, is written here by
an :class:`~lightdist._host_output.OutputRelay`. :class:`lightdist._attach.AgentPlacement` holds one
per attached agent.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from lightdist import _messages as messages
from lightdist._host_output import OutputRelay
from lightdist._messages import Assignment, KillOrder, RankBoot
from lightdist.protocol import Kind

__all__ = ["AgentHost"]


class AgentHost:
    """The driver's handle on one attached host (its agent); any thread may call the methods."""

    def __init__(
        self, send: Callable[[Kind, list[bytes], list[bytes]], None], sender: str, facts: dict[str, Any]
    ) -> None:
        self._send_to = send
        self.sender = sender
        self.name = str(facts.get("host") or sender)
        self.nproc = int(facts["nproc"])
        self.facts = facts
        self.ranks: list[int] = []  # global ranks, in local-rank order
        self.node_rank = 0
        self.pids: dict[int, int] = {}
        self.lost = False
        self.last_heard = self.last_ping = time.monotonic()
        self.pinged = 0  # the number of the last PING sent
        self.answered = 0  # the highest PING number echoed back in a PONG
        self.farewell: str | None = None  # what EXIT tells the agent: None, the pool was stopped
        self._changed = threading.Condition()
        self.output = OutputRelay(self.name, self._credit)  # its ranks' output, written here

    def _credit(self, items: int, nbytes: int) -> None:  # the relay's thread, once it wrote them
        if not self.lost:
            self._send(Kind.CREDIT, [messages.encode_credit(items, nbytes)])

    def _send(self, kind: Kind, payload: list[bytes]) -> None:
        self._send_to(kind, payload, [self.sender.encode()])

    def assign(self, assignment: Assignment) -> None:
        """Give this host its ranks. A spare is assigned none: it still gets its lease (so a dead
        driver takes it down too) and starts its template, ready to take over a lost host's ranks."""
        self.ranks = list(assignment.ranks)
        self.node_rank = assignment.node_rank
        self._send(Kind.ASSIGN, [messages.encode_assign(assignment)])

    def spawn(self, rank: int, boot: RankBoot) -> None:
        # a one-rank `lightdist worker` (torchrun) keeps the local rank its launcher gave it: its GPU
        local = self.facts.get("local_rank", self.ranks.index(rank))
        boot = dataclasses.replace(
            boot,
            local_rank=local,
            node_rank=self.facts.get("node_rank", self.node_rank),  # a torchrun worker: torchrun's node index
            local_world_size=self.facts.get("local_world_size", len(self.ranks)),
        )
        self._send(Kind.SPAWN, [messages.encode_spawn(boot)])

    def signal_ranks(self, sig: int, ranks: list[int] | None = None) -> None:
        targets = self.ranks if ranks is None else [r for r in ranks if r in self.ranks]
        if targets and not self.lost:
            self._send(Kind.KILL, [messages.encode_kill(KillOrder(targets, int(sig)))])

    @property
    def hint(self) -> int | None:
        """The launcher's node index the agent reported (``SLURM_NODEID``, ...), if any."""
        hint = self.facts.get("node_hint")
        return hint if isinstance(hint, int) and not isinstance(hint, bool) else None

    def ping(self) -> int:
        self.last_ping = time.monotonic()
        self.pinged += 1
        self._send(Kind.PING, [messages.encode_ping(self.pinged)])
        return self.pinged

    def note_spawned(self, rank: int, pid: int) -> None:
        with self._changed:
            self.pids[rank] = pid
            self._changed.notify_all()

    def note_exited(self, rank: int, pid: int) -> None:
        with self._changed:
            if self.pids.get(rank) == pid:
                del self.pids[rank]
            self._changed.notify_all()

    def mark_lost(self) -> dict[int, int]:
        """This host is gone: forget its processes (returned: the ones that were alive)."""
        with self._changed:
            self.lost = True
            gone, self.pids = self.pids, {}
            self._changed.notify_all()
        self.output.close(wait=False)  # under the pool's lock: never wait on a blocked stdout here
        return gone

    def wait_ranks_gone(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self.pids or self.lost, max(0.0, timeout))

    def close(self, grace: float = 2.0) -> None:
        """The pool is stopping: the agent stops its template (killing what is left) and exits,
        with a status that says whether the pool ended normally (see :attr:`farewell`)."""
        if not self.lost:
            self._send(Kind.EXIT, [messages.encode_farewell(self.farewell)])
        self.output.close()
