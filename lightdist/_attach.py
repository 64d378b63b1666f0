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
(an agent that attached beyond the expected count) or wait for a new agent until the recovery
deadline. An agent that hears nothing from the driver for its lease kills its ranks and exits, so a
dead driver takes every host down.

Everything here runs under ``Pool._lock`` (the I/O thread or a leading caller routes messages).
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any

from lightdist._procs import RankExit
from lightdist.protocol import Kind, Message

if TYPE_CHECKING:
    from lightdist._pool import Pool

__all__ = ["AGENT_PREFIX", "AgentHost", "AttachMixin", "HEARTBEAT_S", "HOST_TIMEOUT_S", "LEASE_S", "timings"]

log = logging.getLogger("lightdist")
AGENT_PREFIX = "agent."  # sender names of agents; also their ZMQ identities
HOST_TIMEOUT_S = 2.0  # default silence after which the driver declares a host lost (host_timeout=)
HEARTBEAT_S = HOST_TIMEOUT_S / 4  # the driver PINGs each agent this often
LEASE_S = HOST_TIMEOUT_S * 1.5  # silence after which an agent gives up on the driver: > the host timeout


def timings(host_timeout: float) -> tuple[float, float]:
    """(heartbeat interval, agent lease) for a pool's ``host_timeout``: 4 pings per timeout, and a
    lease long enough that the driver declares a silent host lost before its agent gives up."""
    return host_timeout / 4, host_timeout * 1.5


class AgentHost:
    """The driver's handle on one attached host (its agent); any thread may call the methods."""

    def __init__(self, pool: Pool, sender: str, facts: dict[str, Any]) -> None:
        self._pool = pool
        self.sender = sender
        self.name = str(facts.get("host") or sender)
        self.nproc = int(facts["nproc"])
        self.facts = facts
        self.ranks: list[int] = []  # global ranks, in local-rank order
        self.node_rank = 0
        self.pids: dict[int, int] = {}
        self.lost = False
        self.last_heard = self.last_ping = time.monotonic()
        self._changed = threading.Condition()

    def _send(self, kind: Kind, payload: list[bytes], call: int = 0) -> None:
        self._pool.channel.send(kind, call or self._pool.host_generation, payload, to=[self.sender.encode()])

    def assign(self, ranks: list[int], node_rank: int, num_nodes: int) -> None:
        """Give this host its ranks. A spare is assigned none: it still gets its lease (so a dead
        driver takes it down too) and starts its template, ready to take over a lost host's ranks."""
        self.ranks = list(ranks)
        self.node_rank = node_rank
        cfg = self._pool.config
        heartbeat, lease = timings(cfg.host_timeout)
        settings = {"ranks": ranks, "node_rank": node_rank, "num_nodes": num_nodes, "lease_s": lease,
                    "heartbeat_s": heartbeat, "imports": list(cfg.imports), "cwd": cfg.cwd}  # fmt: skip
        self._send(Kind.ASSIGN, [json.dumps(settings).encode()])

    def spawn(self, rank: int, boot: dict[str, Any]) -> None:
        # a one-rank `lightdist worker` (torchrun) keeps the local rank its launcher gave it: its GPU
        local = self.facts.get("local_rank", self.ranks.index(rank))
        boot = {**boot, "local_rank": local, "local_world_size": self.facts.get("local_world_size", len(self.ranks)),
                "node_rank": self.node_rank}  # fmt: skip
        self._send(Kind.SPAWN, [pickle.dumps(boot, protocol=5)])

    def signal_ranks(self, sig: int, ranks: list[int] | None = None) -> None:
        targets = self.ranks if ranks is None else [r for r in ranks if r in self.ranks]
        if targets and not self.lost:
            self._send(Kind.KILL, [json.dumps({"ranks": targets, "signal": int(sig)}).encode()])

    def ping(self) -> None:
        self.last_ping = time.monotonic()
        self._send(Kind.PING, [])

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
        return gone

    def wait_ranks_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.pids and not self.lost:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def close(self, grace: float = 2.0) -> None:
        """The pool is stopping: the agent stops its template (killing what is left) and exits."""
        if not self.lost:
            self._send(Kind.EXIT, [])


class AttachMixin:
    """The attach / form / heartbeat / host-loss part of :class:`~lightdist._pool.Pool`."""

    # Provided by Pool (see there).
    if TYPE_CHECKING:
        _agents: dict[str, AgentHost]
        _spares: list[AgentHost]
        _fenced: set[str]
        _homeless: set[int]
        _lost_groups: list[list[int]]
        _rank_hosts: dict[int, Any]
        _store: Any
        host_generation: int
        state: str
        world_size: int
        channel: Any
        config: Any

        def _spawn(self, rank: int) -> None: ...
        def _rank_exited(self, info: RankExit) -> None: ...
        def _on_broken(self, err: BaseException) -> None: ...

    def attach_status(self) -> str:
        """For a start that timed out: which hosts attached, how many are missing."""
        expected = self.config.nodes or 0
        names = sorted(host.name for host in self._agents.values())
        if self.config.host_names is not None:
            wanted = [name for name in names if name in self.config.host_names]
            missing = [name for name in self.config.host_names if name not in names]
            attached = f"{len(wanted)} of {expected} hosts attached ({', '.join(wanted) or 'none'}); missing: "
            attached += ", ".join(missing)
            others = [name for name in names if name not in self.config.host_names]
            if others:
                attached += f" (also attached, not asked for: {', '.join(others)})"
        else:
            attached = f"{len(names)} of {expected} hosts attached ({', '.join(names) or 'none'})"
        return (f"{attached}; start 'lightdist agent --connect {self.channel_address_for_agents()} "
                "--key-file ...' on each missing host")

    def channel_address_for_agents(self) -> str:
        return str(getattr(self, "address", self.config.worker_address))  # the bound one (port 0 resolved)

    def _on_agent_message(self, msg: Message) -> None:
        h = msg.header
        if h.sender in self._fenced:
            self.channel.send(Kind.FENCED, 0, [], to=[h.sender.encode()])
            return
        host = self._agents.get(h.sender)
        if host is None:
            if h.kind is Kind.HELLO:
                self._on_hello(h.sender, json.loads(msg.payload[0]))
            return
        host.last_heard = time.monotonic()
        if h.kind is Kind.HOST_EVENT:
            self._on_host_event(host, json.loads(msg.payload[0]))

    def _on_hello(self, sender: str, facts: dict[str, Any]) -> None:
        self.channel.accept_from(sender)
        host = AgentHost(self, sender, facts)  # type: ignore[arg-type]
        self._agents[sender] = host
        log.info("host %s attached (%d ranks)", host.name, host.nproc)
        if self.state == "starting" and not self._rank_hosts:
            self._maybe_form()
        else:
            self._spares.append(host)
            host.assign([], node_rank=-1, num_nodes=self.config.nodes or 1)  # see _assign_spares
            self._rehost()

    def _maybe_form(self) -> None:
        """Form the pool once the store is up and the expected hosts attached (HELLOs may come first)."""
        if self.state == "starting" and not self._rank_hosts and self._store is not None:
            if len(self._chosen_hosts()) >= (self.config.nodes or 0):
                self._form()

    def _chosen_hosts(self) -> list[AgentHost]:
        """The hosts that form the pool, in rank order: by name when named, else by placement hint."""
        names = self.config.host_names
        if names is not None:
            by_name = {host.name: host for host in self._agents.values()}
            return [by_name[name] for name in names if name in by_name]
        return sorted(self._agents.values(), key=_placement_order)[: self.config.nodes]

    def _form(self) -> None:
        hosts = self._chosen_hosts()
        self._spares = [host for host in self._agents.values() if host not in hosts]
        per_host = self.world_size // len(hosts)
        if any(host.nproc != per_host for host in hosts):
            # equal ranges keep node_rank = rank // nproc true, which Lightning and spares rely on
            layout = ", ".join(f"{host.name}: {host.nproc}" for host in hosts)
            self._on_broken(ValueError(
                f"every host must run world_size / nodes = {per_host} ranks, but the attached hosts bring "
                f"{layout}; start each agent with --nproc-per-node {per_host}"))  # fmt: skip
            return
        first = 0
        for node_rank, host in enumerate(hosts):
            ranks = list(range(first, first + host.nproc))
            first += host.nproc
            host.assign(ranks, node_rank, len(hosts))
            for rank in ranks:
                self._rank_hosts[rank] = host
        for spare in self._spares:
            spare.assign([], node_rank=-1, num_nodes=len(hosts))
        for rank in range(self.world_size):
            self._spawn(rank)

    def _on_host_event(self, host: AgentHost, event: dict[str, Any]) -> None:
        kind = event["ev"]
        if kind == "spawned":
            host.note_spawned(event["rank"], event["pid"])
        elif kind == "exit":
            host.note_exited(event["rank"], event["pid"])
            self._rank_exited(RankExit(event["rank"], event["pid"], event["sender"], event["code"], event["signal"],
                                       f"on host {host.name}"))  # fmt: skip
        elif kind == "lost":  # the agent's template process failed
            self._host_lost(host, f"its template process failed: {event.get('detail', '')}")

    def _heartbeat(self, now: float) -> float | None:
        """PING due agents, declare silent ones lost; seconds until the next heartbeat work."""
        due = None
        host_timeout = self.config.host_timeout
        heartbeat, _ = timings(host_timeout)
        for host in list(self._agents.values()):
            if now - host.last_heard > host_timeout:
                self._host_lost(host, f"no heartbeat for {now - host.last_heard:.1f} s")
                continue
            if now - host.last_ping >= heartbeat:
                host.ping()
            next_work = min(host.last_ping + heartbeat, host.last_heard + host_timeout)
            due = next_work if due is None else min(due, next_work)
        return due

    def _host_lost(self, host: AgentHost, why: str) -> None:
        log.warning("host %s lost: %s", host.name, why)
        self._agents.pop(host.sender, None)
        if host in self._spares:
            self._spares.remove(host)
        self._fenced.add(host.sender)
        self.channel.send(Kind.FENCED, 0, [], to=[host.sender.encode()])  # reaches it if it is only slow
        self.channel.forget(host.sender)
        senders = {rank: self._senders.get(rank, "") for rank in host.ranks}  # type: ignore[attr-defined]
        alive = host.mark_lost()
        if self.state in ("stopping", "closed", "broken") or not host.ranks:
            return  # a spare, or an agent that left before the pool formed: nothing ran there
        for rank in host.ranks:
            self._rank_hosts[rank] = None  # re-hosted when a spare or a new agent attaches
        self._lost_groups.append(list(host.ranks))
        self._homeless |= set(host.ranks)
        if self.state == "starting":
            self._on_broken(RuntimeError(f"host {host.name} was lost while the pool started: {why}"))
            return
        # One event for all of them; a rank whose exit was already reported is skipped by sender
        # (its sender was replaced or it is in _dead already).
        gone = [RankExit(rank, alive.get(rank, 0), senders[rank], None, None, f"host {host.name} was lost ({why})")
                for rank in host.ranks if rank not in self._dead]  # type: ignore[attr-defined]  # fmt: skip
        self._ranks_exited(gone)  # type: ignore[attr-defined]

    def _place_homeless(self) -> None:
        """Give each lost host's ranks, as a group, to a spare host with room for them."""
        for group in list(self._lost_groups):
            spare = next((host for host in self._spares if host.nproc >= len(group)), None)
            if spare is None:
                continue
            self._spares.remove(spare)
            self._lost_groups.remove(group)
            # the spare takes the lost host's place in the layout (hosts hold equal rank ranges)
            spare.assign(group, node_rank=group[0] // len(group), num_nodes=self.config.nodes or 1)
            for rank in group:
                self._rank_hosts[rank] = spare
            log.warning("ranks %s moved to host %s", group, spare.name)
        self._homeless = {rank for group in self._lost_groups for rank in group}

    def _rehost(self) -> None:
        """A host attached while ranks were waiting for one: place them there and start them."""
        if self._homeless and self.state == "recovering":
            waiting = sorted(self._homeless)
            self._place_homeless()
            for rank in waiting:
                if self._rank_hosts.get(rank) is not None:
                    self._spawn(rank)


def _placement_order(host: AgentHost) -> tuple[int, str, str]:
    # A launcher's node index (SLURM_NODEID, a pod's completion index, torchrun's GROUP_RANK) is a
    # hint that keeps rank ranges in the cluster's order; the host name breaks ties.
    hint = host.facts.get("node_hint")
    return (int(hint) if isinstance(hint, int) else 1 << 30, host.name, host.sender)
