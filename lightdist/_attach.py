"""Hosts attached by agents: the driver's side of a pool that spans machines.

One ``lightdist agent`` per host (started by ``srun``, a pod, ssh or Ray) connects to the driver's
ROUTER over TCP and says HELLO with its host facts. When the expected number of hosts is attached
the driver *forms* the pool: it gives each host a contiguous range of ranks, sends it ASSIGN (its
generation, lease and heartbeat) and then one SPAWN per rank; the agent forks the ranks with the
single-host template, and the ranks connect to the driver themselves. From then on an agent is a
:class:`~lightdist._procs.RankHost` like the local template: it reports rank exits (HOST_EVENT) and
signals ranks on request (KILL).

Liveness: the driver PINGs every agent 4 times per ``host_timeout`` (2 s by default); an agent not
heard from for ``host_timeout`` is *lost*: its ranks are reported dead (the running call fails with
``WorkerDiedError`` naming the host), its name is fenced (anything it sends later is answered with
FENCED, so a healed host's agent kills its old ranks and exits), and its ranks move to a spare host
(an agent that attached beyond the expected count) or wait for a new agent; calls waiting for them
fail after ``rehost_timeout`` (and later calls at once) with a message naming the host, until a host
takes them. An agent that hears nothing from the driver for its lease kills its ranks and exits, so
a dead driver takes every host down.

Who serves: hosts are ordered by their launcher's node index (the agent's ``node_hint``), then by
name. When some attached agents carry a hint but fewer than ``nodes`` do, the pool waits up to
``HINT_GRACE_S`` for more hinted agents before hint-less ones fill the remaining places, so an agent
that attached a moment late does not become a spare while a hint-less one takes its ranks.

:class:`AgentPlacement` holds every multi-host fact (agents, spares, fenced names, ranks waiting for
a host) and never calls into the pool: it returns :mod:`lightdist._placement` events. Everything
here runs under ``Pool._lock`` (the I/O thread or a leading caller routes messages).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lightdist import _messages as messages
from lightdist._agent_host import AgentHost
from lightdist._host_output import say
from lightdist._identity import NameClaims, refusal
from lightdist._messages import Assignment, HostEvent
from lightdist._placement import HostLost, HostsMissing, PlacementEvent, PoolFailed, RankExited, SpawnRanks
from lightdist._procs import RankExit, RankHost
from lightdist._rehost import Homeless, span
from lightdist._state import PoolState
from lightdist.protocol import Kind, Message
from lightdist.transport import Channel

__all__ = ["AgentHost", "AgentPlacement", "HINT_GRACE_S", "HOST_TIMEOUT_S", "LEASE_S", "REHOST_TIMEOUT_S", "timings"]

log = logging.getLogger("lightdist")
HOST_TIMEOUT_S = 2.0  # default silence after which the driver declares a host lost (host_timeout=)
# Default wait for another host to take a lost host's ranks before calls fail (rehost_timeout=):
# long enough for a launcher to restart an agent (a rescheduled pod, a requeued step: seconds to a
# minute, plus the agent's attach), short enough that callers hear of it in minutes, not at the
# start() timeout (30 min).
REHOST_TIMEOUT_S = 120.0
# How long hinted agents that have not attached yet keep their places while hint-less ones wait:
# agents a launcher starts together attach within a second or two of each other.
HINT_GRACE_S = 5.0


def timings(host_timeout: float) -> tuple[float, float]:
    """(heartbeat interval, agent lease) for a pool's ``host_timeout``: 4 pings per timeout, and a
    lease long enough that the driver declares a silent host lost before its agent gives up."""
    return host_timeout / 4, host_timeout * 1.5


LEASE_S = timings(HOST_TIMEOUT_S)[1]  # an agent's lease under the default host timeout


class AgentPlacement:
    """Hosts attached by agents: attach, form, heartbeat, fencing, spares (see the module docstring)."""

    def __init__(
        self,
        channel: Channel,
        world_size: int,
        nodes: int,
        host_names: tuple[str, ...] | None,
        host_timeout: float,
        imports: list[str],
        cwd: str | None,
        address: str,
        rehost_timeout: float = REHOST_TIMEOUT_S,
        key_file: str | None = None,
    ) -> None:
        self.channel = channel
        self.address = address  # where agents connect (the bound one: port 0 resolved)
        self.key_file = key_file  # the driver's key file: its client file is named in hints
        self.world_size = world_size
        self.nodes = nodes
        self.host_names = host_names
        self.host_timeout = host_timeout
        self.imports = imports
        self.cwd = cwd
        self.generation = 1  # the agents' generation: the call field of driver <-> agent messages
        self.store_up = False  # ranks can only join once the driver's store listens
        self._rank_hosts: dict[int, AgentHost | None] = {}  # None: its host was lost
        self._agents: dict[str, AgentHost] = {}  # attached hosts by agent sender name (spares included)
        self._spares: list[AgentHost] = []
        self._fenced: set[str] = set()  # agents declared lost: they are told so if they speak again
        self._homeless = Homeless(rehost_timeout, address)  # ranks of lost hosts, waiting for a host
        self._probe: dict[str, int] = {}  # agent sender -> the PING number its answer must echo
        self._form_after: float | None = None  # hinted agents are awaited until then (HINT_GRACE_S)
        self._claims = NameClaims()  # newcomers whose name a live agent holds (see _identity)
        self._said_waiting = False

    def _send(self, kind: Kind, payload: list[bytes], to: list[bytes]) -> None:
        self.channel.send(kind, self.generation, payload, to=to)

    # --- the Placement interface -------------------------------------------------------------------
    def host_of(self, rank: int) -> RankHost | None:
        return self._rank_hosts.get(rank)

    def hosts(self) -> list[RankHost]:
        return list(self._agents.values())

    def host_ranks(self) -> dict[str, list[int]]:
        """``{host name: ranks}`` of the hosts that hold ranks (spares hold none)."""
        out: dict[str, list[int]] = {}
        for rank, host in sorted(self._rank_hosts.items()):
            if host is not None:
                out.setdefault(host.name, []).append(rank)
        return out

    def formed(self) -> bool:
        return bool(self._rank_hosts)

    def claim(self, ranks: list[int]) -> None:
        if any(self._rank_hosts.get(rank) is None for rank in ranks):
            self._place_lost_groups()
            waiting = sorted(rank for rank in ranks if self._rank_hosts.get(rank) is None)
            if waiting and not self._said_waiting:  # once per wait, not per recovery attempt
                self._said_waiting = True
                log.warning(
                    "ranks %s wait for a host (calls fail after %.0f s, rehost_timeout): restart the lost host's "
                    "agent, or %s",
                    waiting,
                    self._homeless.timeout,
                    self.command(),
                )

    def probe(self) -> float:
        self._probe = {host.sender: host.ping() for host in self._agents.values() if host.ranks}
        return self.host_timeout if self._probe else 0.0

    def probed(self) -> bool:
        for sender, number in self._probe.items():
            host = self._agents.get(sender)  # a lost host is gone from here: its loss was the answer
            if host is not None and host.answered < number:
                return False
        return True

    def missing(self) -> BaseException | None:
        text = self._homeless.missing()
        return None if text is None else RuntimeError(text)

    def closing(self, failure: str | None) -> None:
        for host in self._agents.values():
            host.farewell = None if failure is None else (failure.splitlines() or [""])[0]  # one line

    def close_linger_ms(self) -> int:
        # Agents must get their EXIT before the socket goes (linger 0 would drop it; they would
        # then only leave when their lease runs out).
        return 1000 if self._agents else 0

    def status(self) -> str:
        """For a start that timed out: which hosts attached, how many are missing."""
        names = sorted(host.name for host in self._agents.values())
        if self.host_names is not None:
            wanted = [name for name in names if name in self.host_names]
            missing = [name for name in self.host_names if name not in names]
            attached = f"{len(wanted)} of {self.nodes} hosts attached ({', '.join(wanted) or 'none'}); missing: "
            attached += ", ".join(missing)
            others = [name for name in names if name not in self.host_names]
            if others:
                attached += f" (also attached, not asked for: {', '.join(others)})"
        else:
            attached = f"{len(names)} of {self.nodes} hosts attached ({', '.join(names) or 'none'})"
        return f"{attached}; {self.command()} on each missing host"

    def command(self) -> str:
        """What to run on another host to attach it: the hint in start and wait messages."""
        client = "CLIENT_KEY_FILE"
        if self.key_file is not None:  # `lightdist keys create` puts client.json next to driver.json
            beside = Path(self.key_file).with_name("client.json")
            client = str(beside) if beside.exists() else client
        return (
            f"start 'lightdist agent --connect {self.address} --key-file {client} "
            f"--nproc-per-node {self.world_size // self.nodes}'"
        )

    def on_message(self, msg: Message, state: PoolState) -> list[PlacementEvent]:
        h = msg.header
        if h.sender in self._fenced:
            self.channel.send(Kind.FENCED, 0, [], to=[h.sender.encode()])
            return []
        host = self._agents.get(h.sender)
        if host is None:
            if h.kind is Kind.HELLO:
                return self._on_hello(h.sender, messages.decode_hello(msg.payload[0]), state)
            return []
        host.last_heard = time.monotonic()
        if self._claims:  # it spoke: anyone claiming its name meanwhile is a live duplicate
            for claim in self._claims.refuted(host.name, host.last_heard):
                why = refusal(host.name, host)
                log.warning("refused an agent (pid %s at %s): %s", claim.facts.get("pid"), claim.facts.get("ip"), why)
                self.channel.send(Kind.REFUSED, 0, [messages.encode_refused(why)], to=[claim.sender.encode()])
        if h.kind is Kind.HOST_EVENT:
            return self._on_host_event(host, messages.decode_host_event(msg.payload[0]), state)
        if h.kind is Kind.PONG and msg.payload:
            host.answered = max(host.answered, messages.decode_ping(msg.payload[0]))
        if h.kind is Kind.OUTPUT:
            stream, text = messages.decode_output(msg.payload)
            host.output.put(stream, text, len(msg.payload[1]))
        return []

    def tick(self, now: float, state: PoolState) -> tuple[list[PlacementEvent], float | None]:
        """PING due agents, declare silent ones lost, form the pool once hinted agents had their
        grace, give up on hosts for lost ranks; seconds until the next such work."""
        events: list[PlacementEvent] = []
        due: list[float] = []
        heartbeat, _ = timings(self.host_timeout)
        for host in list(self._agents.values()):
            if now - host.last_heard > self.host_timeout:
                events += self._host_lost(host, f"no heartbeat for {now - host.last_heard:.1f} s", state)
                continue
            if now - host.last_ping >= heartbeat:
                host.ping()
            due.append(min(host.last_ping + heartbeat, host.last_heard + self.host_timeout))
        if self._form_after is not None:
            events += self.try_form(state, now)
            if self._form_after is not None:
                due.append(self._form_after)
        if not state.over:
            expired, rehost_due = self._homeless.expire(now)
            for text in expired:
                log.warning("%s", text)
                events.append(HostsMissing(RuntimeError(text)))
            if rehost_due is not None:
                due.append(rehost_due)
        return events, max(0.0, min(due) - now) if due else None

    def try_form(self, state: PoolState, now: float | None = None) -> list[PlacementEvent]:
        """Form the pool once the store is up and the expected hosts attached (HELLOs may come
        first), and hinted agents that are still to come had their grace (see the module docstring)."""
        if not (state is PoolState.STARTING and not self._rank_hosts and self.store_up):
            self._form_after = None
            return []
        if len(self._chosen_hosts()) < self.nodes:
            self._form_after = None  # (a host left during the grace: it starts again with the next)
            if not self._said_waiting:  # a start that waits says for what, once
                self._said_waiting = True
                say(f"waiting for {self.status()}")
            return []
        now = time.monotonic() if now is None else now
        hinted = sum(host.hint is not None for host in self._agents.values())
        if self.host_names is None and 0 < hinted < self.nodes:
            if self._form_after is None:
                self._form_after = now + HINT_GRACE_S
                log.info(
                    "%d of %d hosts give a node index: waiting %.0f s for the others", hinted, self.nodes, HINT_GRACE_S
                )
            if now < self._form_after:
                return []
        self._form_after = None
        return self._form()

    # --- attach and form ---------------------------------------------------------------------------
    def _on_hello(self, sender: str, facts: dict[str, Any], state: PoolState) -> list[PlacementEvent]:
        name = str(facts.get("host") or sender)
        if any(host.name == name for host in self._agents.values()):
            self._claims.hold(name, sender, facts, time.monotonic())  # its holder decides: see _identity
            return []
        self.channel.accept_from(sender)
        host = AgentHost(self._send, sender, facts)
        self._agents[sender] = host
        log.info("host %s attached (%d ranks)", host.name, host.nproc)
        if state is PoolState.STARTING and not self._rank_hosts:
            return self.try_form(state)
        self._spares.append(host)
        host.assign(self._assignment([], node_rank=-1))
        return self._rehost(state)

    def _assignment(self, ranks: list[int], node_rank: int) -> Assignment:
        heartbeat, lease = timings(self.host_timeout)
        return Assignment(
            ranks=ranks,
            node_rank=node_rank,
            num_nodes=self.nodes,
            lease_s=lease,
            heartbeat_s=heartbeat,
            imports=self.imports,
            cwd=self.cwd,
        )

    def _chosen_hosts(self) -> list[AgentHost]:
        """The hosts that form the pool, in rank order: by name when named, else by placement hint."""
        if self.host_names is not None:
            by_name = {host.name: host for host in self._agents.values()}
            return [by_name[name] for name in self.host_names if name in by_name]
        return sorted(self._agents.values(), key=_placement_order)[: self.nodes]

    def _form(self) -> list[PlacementEvent]:
        hosts = self._chosen_hosts()
        self._spares = [host for host in self._agents.values() if host not in hosts]
        per_host = self.world_size // len(hosts)
        if any(host.nproc != per_host for host in hosts):
            # equal ranges keep node_rank = rank // nproc true, which Lightning and spares rely on
            layout = ", ".join(f"{host.name}: {host.nproc}" for host in hosts)
            return [
                PoolFailed(
                    ValueError(
                        f"every host must run world_size / nodes = {per_host} ranks, but the attached hosts bring "
                        f"{layout}; start each agent with --nproc-per-node {per_host}"
                    )
                )
            ]
        first = 0
        for node_rank, host in enumerate(hosts):
            ranks = list(range(first, first + host.nproc))
            first += host.nproc
            host.assign(self._assignment(ranks, node_rank))
            for rank in ranks:
                self._rank_hosts[rank] = host
        for spare in self._spares:
            spare.assign(self._assignment([], node_rank=-1))
        self._said_waiting = False
        return [SpawnRanks(list(range(self.world_size)))]

    # --- what happens on the hosts ---------------------------------------------------------------
    def _on_host_event(self, host: AgentHost, event: HostEvent, state: PoolState) -> list[PlacementEvent]:
        if event.ev == "spawned":
            host.note_spawned(event.rank, event.pid)
        elif event.ev == "exit":
            host.note_exited(event.rank, event.pid)
            info = RankExit(event.rank, event.pid, event.sender, event.code, event.signal, f"on host {host.name}")
            return [RankExited(info)]
        elif event.ev == "lost":  # the agent's template process failed
            return self._host_lost(host, f"its template process failed: {event.detail}", state)
        elif event.ev == "left":  # the agent is stopping (its launcher's SIGTERM): no need to wait for silence
            return self._host_lost(host, event.detail, state, verb="left")
        return []

    def _host_lost(self, host: AgentHost, why: str, state: PoolState, verb: str = "was lost") -> list[PlacementEvent]:
        self._agents.pop(host.sender, None)
        if host in self._spares:
            self._spares.remove(host)
        self._fenced.add(host.sender)
        self.channel.send(Kind.FENCED, 0, [], to=[host.sender.encode()])  # reaches it if it is only slow
        self.channel.forget(host.sender)
        alive = host.mark_lost()
        events: list[PlacementEvent] = []
        if state.over or not host.ranks or state is PoolState.STARTING:
            log.warning("host %s %s: %s", host.name, verb, why)  # else the pool says it, with its ranks
        if not state.over and host.ranks:
            for rank in host.ranks:
                self._rank_hosts[rank] = None  # re-hosted when a spare or a new agent attaches
            self._homeless.add(host.name, host.ranks, why)
            if state is PoolState.STARTING:
                return [PoolFailed(RuntimeError(f"host {host.name} {verb} while the pool started: {why}"))]
            events.append(HostLost(host.name, list(host.ranks), alive, f"host {host.name} {verb} ({why})"))
        claim = self._claims.vacated(host.name)
        if claim is not None:  # an agent restarted under this name while the old one was still attached
            events += self._on_hello(claim.sender, claim.facts, state)
        return events

    def _place_lost_groups(self) -> None:
        """Give each lost host's ranks, as a group, to a spare host with room for them: the host
        itself if it came back, else by launcher hint, else in arrival order (see _identity)."""
        for group, spare in self._homeless.place(self._spares):
            ranks = group.ranks
            # the spare takes the lost host's place in the layout (hosts hold equal rank ranges)
            spare.assign(self._assignment(ranks, node_rank=ranks[0] // len(ranks)))
            for rank in ranks:
                self._rank_hosts[rank] = spare
            if spare.name == group.host:
                log.info("host %s is back: %s run there again", spare.name, span(ranks))
            else:
                log.warning("%s of lost host %s moved to host %s", span(ranks), group.host, spare.name)
        if not self._homeless.groups:
            self._said_waiting = False  # the next wait for a host is said again

    def _rehost(self, state: PoolState) -> list[PlacementEvent]:
        """A host attached while ranks were waiting for one: place them there and start them."""
        waiting = self._homeless.ranks()
        if not waiting or state is not PoolState.RECOVERING:
            return []
        self._place_lost_groups()
        placed = [rank for rank in waiting if self._rank_hosts.get(rank) is not None]
        return [SpawnRanks(placed)] if placed else []


def _placement_order(host: AgentHost) -> tuple[int, str, str]:
    # A launcher's node index (SLURM_NODEID, a pod's completion index, torchrun's GROUP_RANK) is a
    # hint that keeps rank ranges in the cluster's order; the host name breaks ties.
    return (host.hint if host.hint is not None else 1 << 30, host.name, host.sender)
