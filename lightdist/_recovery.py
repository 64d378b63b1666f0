"""Failure handling for :class:`~lightdist._pool.Pool`: dead ranks, stuck ranks, recovery.

The rule: recovery starts only once no live rank is inside a call. A failed or cancelled call gives
the ranks still running it ``grace_period`` seconds (they see ``cancelled``), then ``Pool._tick``
kills them. When the call is over, ranks that were lost are respawned (``setup`` runs again with
the original kwargs) and the others leave their process group and join a fresh one under a new
store prefix, keeping their ``setup`` state. Calls queue meanwhile. Everything here runs under
``Pool._lock`` (from the monitor thread, the I/O thread, or a caller).
"""

from __future__ import annotations

import logging
import pickle
import signal
import threading
import time
from typing import TYPE_CHECKING

from lightdist._resident import ResidentSet
from lightdist._calls import ERROR, Event, PendingCall, worker_error
from lightdist._procs import RankExit, RankHost
from lightdist.errors import WorkerDiedError
from lightdist.protocol import Kind

if TYPE_CHECKING:
    import collections

    from lightdist._procs import TemplateProcess
    from lightdist.transport import Waker

__all__ = ["RecoveryMixin"]

log = logging.getLogger("lightdist")
MAX_RECOVERY_RESTARTS = 3  # ranks dying again while recovery restarts them: give up after this many


class RecoveryMixin:
    # Provided by Pool.
    _lock: threading.RLock
    state: str
    world_size: int
    broken: BaseException | None
    current: PendingCall | None
    startup: PendingCall
    template: TemplateProcess | None
    _rank_hosts: dict[int, RankHost | None]
    recoveries: int
    _senders: dict[int, str]
    _dead: set[int]
    _idle_death: WorkerDiedError | None
    _generation: int
    _store_prefix: str
    _start_timeout: float
    _recovery_pending: set[int]
    _recovery_deadline: float | None
    _recovery_started: float
    _recovery_restarts: int
    last_recovery_seconds: float | None
    resident: ResidentSet

    if TYPE_CHECKING:
        _queue: collections.deque[PendingCall]

        def _fail(self, call: PendingCall, err: BaseException) -> None: ...
        def _finish(self, call: PendingCall) -> None: ...
        def _dispatch(self) -> None: ...
        def _spawn(self, rank: int) -> None: ...
        def _send_to(self, kind: Kind, call: int, payload: list[bytes], ranks: set[int] | None = None) -> None: ...

        _io_waker: Waker

    def _rank_exited(self, info: RankExit) -> None:  # monitor thread
        self._ranks_exited([info])

    def _ranks_exited(self, infos: list[RankExit]) -> None:
        """Ranks died together (one process, or every rank of a lost host): one failure event.

        Handled as one so that the ranks of a lost host start one recovery, not one per rank (a
        second death during recovery restarts every rank, and restarts are capped)."""
        with self._lock:
            if self.state in ("stopping", "closed", "broken"):
                return
            # a previous life of a rank (killed by us and replaced) is expected to die
            infos = [info for info in infos if self._senders.get(info.rank) == info.sender]
            if not infos:
                return
            first = infos[0]
            err = WorkerDiedError(first.rank, first.exitcode, first.signal, first.detail)
            if self.state == "starting":
                self.startup.push(Event(ERROR, err))
                return
            ranks = {info.rank for info in infos}
            self._dead |= ranks
            log.warning("%s%s; recovering the pool", err, f" (and ranks {sorted(ranks - {first.rank})})"
                        if len(ranks) > 1 else "")  # fmt: skip
            call = self.current
            if self.state == "recovering":
                self._recovery_restarts += 1
                if self._recovery_restarts > MAX_RECOVERY_RESTARTS:
                    # A respawned rank that dies in setup every time would loop forever.
                    self._on_broken(RuntimeError(
                        f"the pool could not recover: ranks kept dying while it restarted them "
                        f"({MAX_RECOVERY_RESTARTS} restarts; last: {err}); fix the cause and call start() again"
                    ))  # fmt: skip
                    return
                self._recover(everything=True)  # a second failure: start every rank afresh
            elif call is not None:
                call.pending -= ranks
                if not call.failed:
                    self._fail(call, err)
                if not call.pending:
                    self._finish(call)
            else:
                self._idle_death = err
                self._recover()

    def _template_lost(self, detail: str) -> None:  # monitor thread
        with self._lock:
            self._on_broken(RuntimeError(f"the pool's template process is gone: {detail}"))

    def _kill(self, ranks: set[int], why: str) -> None:
        for rank in sorted(ranks - self._dead):
            host = self._rank_hosts.get(rank)
            pid = host.pids.get(rank) if host is not None else None
            log.warning("killing rank %d (pid %s on %s): it %s", rank, pid, getattr(host, "name", "?"), why)
            if host is not None and pid is not None:
                host.signal_ranks(signal.SIGKILL, [rank])
            self._dead.add(rank)

    def _recover(self, everything: bool = False) -> None:
        """Respawn lost ranks (setup runs again with the original kwargs) and rebuild the group on a
        fresh store prefix; the other ranks keep their state. Calls queue until it is done."""
        if not everything:
            self._recovery_restarts = 0  # a new episode (restarts within one are counted and capped)
        if everything:
            self._kill(set(range(self.world_size)), "was alive when recovery had to start over")
        self.state = "recovering"
        self.resident.invalidate()  # respawned ranks hold nothing; survivors' copies are in doubt
        self.recoveries += 1
        self._recovery_started = time.monotonic()
        self._generation += 1
        self._store_prefix = f"pg{self._generation}"
        self._recovery_pending = set(range(self.world_size))
        self._recovery_deadline = time.monotonic() + self._start_timeout
        lost, self._dead = self._dead, set()
        survivors = set(range(self.world_size)) - lost
        if survivors:
            self._send_to(Kind.REBUILD, self._generation, [pickle.dumps(self._store_prefix)], survivors)
        for rank in sorted(lost):
            self._spawn(rank)
        self._io_waker.wake()  # arm the recovery deadline

    def _on_recovery_reply(self, rank: int, kind: Kind, payload: tuple[bytes, ...]) -> None:
        if kind is Kind.FAILED:
            err = worker_error(rank, payload[0])
            self._on_broken(RuntimeError(f"the pool could not recover: {err}"))
            return
        self._recovery_pending.discard(rank)
        if not self._recovery_pending:
            self.state = "ready"
            self._recovery_deadline = None
            self.last_recovery_seconds = time.monotonic() - self._recovery_started
            log.info("pool recovered in %.2f s", self.last_recovery_seconds)
            self._dispatch()

    def _on_broken(self, err: BaseException) -> None:
        if self.state in ("stopping", "closed"):
            return
        if self.state == "starting":
            self.startup.push(Event(ERROR, err))
        self.state = "broken"
        self.broken = err
        self._idle_death = None  # superseded: the broken pool's error says more
        self._recovery_deadline = None
        for call in [*([self.current] if self.current else []), *self._queue]:
            if not call.failed:
                call.failed = True
                call.push(Event(ERROR, err))
            call.finished.set()
        self.current = None
        self._queue.clear()
