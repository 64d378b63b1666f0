"""The driver's live pool: the ROUTER channel, the call queue, routing, the I/O thread, start and stop.

The pool is composed of parts that each own one concern and never call back into it:

* a **placement** (:mod:`lightdist._placement`): the hosts that run the ranks, the local template
  process or the agents of other machines (:mod:`lightdist._attach`, attach, heartbeat, fencing,
  spares). It reports what happens on its hosts as events that the pool acts on.
* a :class:`~lightdist._recovery.Recovery`: lost ranks and the episode that brings them back; it
  returns the steps to take and the pool takes them.
* per call, a :class:`~lightdist._calls.PendingCall` (its events and bookkeeping).

Threads and the rule that keeps them apart: all pool state is guarded by ``Pool._lock``; sends go
through the channel's own lock, always taken *inside* ``Pool._lock`` (never the other way round:
deadlocks if re-ordered).

* **caller threads / coroutines** enqueue a call and, when the pool is idle, send its CALL
  themselves (no hand-off on the way out); then they wait on the call's own event buffer.
* one thread at a time **receives**: a blocking caller waiting for its own call leads (it drains
  the socket and routes whatever arrives, so its reply needs no hand-off; see :meth:`Pool.wait_event`);
  otherwise the **I/O thread** does, which also dispatches the next queued call and runs the
  timers (:meth:`Pool._tick`). While a caller leads, the I/O thread stands by on its own waker.
* the **monitor** and **output** threads belong to :class:`~lightdist._procs.TemplateProcess`; the
  monitor reports rank exits here.

No sleep-polling: the I/O thread blocks in ``select`` on the socket's fd and a waker, with a timeout
only when a timer is due.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from lightdist import _messages as messages
from lightdist import _shm, protocol
from lightdist._attach import HOST_TIMEOUT_S, REHOST_TIMEOUT_S, AgentPlacement
from lightdist._calls import ERROR, ITEM, READY, RESULT, Event, PendingCall, Reply, encode_call
from lightdist._messages import AGENT_PREFIX, DRIVER_SENDER, RankBoot
from lightdist._placement import (
    HostLost,
    HostsMissing,
    LocalPlacement,
    PlacementEvent,
    PoolFailed,
    RankExited,
    SpawnRanks,
)
from lightdist._procs import RankExit, RankHost, TemplateProcess
from lightdist._recovery import Recovery
from lightdist._refusals import RefusalLog, signature_refusal
from lightdist._resident import ResidentSet
from lightdist._state import PoolState
from lightdist._tensors import ADDR, FRAMES, SHM, VM
from lightdist.errors import PoolClosedError, WorkerDiedError
from lightdist.protocol import Kind, Message, Session
from lightdist.transport import Channel, Waker, private_ipc_dir, remaining, remove_ipc_dir, thread_waker

if TYPE_CHECKING:
    from lightdist._tensors import Outbound

__all__ = ["Pool", "PoolConfig", "PoolStats", "TransferCounters"]

log = logging.getLogger("lightdist")
HOLD_COLLECTIVE_ERROR_S = 0.25  # see _on_reply
_PLAIN_MANIFEST: dict[str, Any] = {"transport": None, "records": ()}  # a plain reply's (read only)


@dataclass(frozen=True)
class PoolConfig:
    world_size: int
    worker_cls: bytes  # cloudpickled class, unpickled only inside the ranks
    setup_kwargs: bytes
    imports: tuple[str, ...]
    cwd: str | None
    sys_path: tuple[str, ...]
    pg_timeout: float
    accelerator: str
    backend: str | None
    master_addr: str
    master_port: int | None
    worker_address: str | None  # tcp://host:port, or None for a private ipc socket
    keepalive_payload: dict[str, Any]
    keepalive_interval: float | None
    grace_period: float = 2.0  # seconds a rank gets to finish a failed call (or one its peers left)
    nodes: int | None = None  # hosts to wait for (agents attach over TCP); None: ranks on this machine
    host_names: tuple[str, ...] | None = None  # the hosts to wait for by name, in rank order
    host_timeout: float = HOST_TIMEOUT_S  # silence after which an attached host is lost (see _attach.timings)
    rehost_timeout: float = REHOST_TIMEOUT_S  # a lost host's ranks wait this long for another host; then calls fail
    curve: Any = None  # DriverKeys: CURVE server keys and client allow-list for a TCP channel
    tensor_transport: str = "auto"  # "auto": shared memory on one host, frames across hosts; "frames"
    max_frame_bytes: int | None = None  # the command socket's inbound frame limit (None: none)
    stream_window: tuple[int, int] = (1024, 64 << 20)  # stream items / bytes a caller may leave unread


@dataclass
class TransferCounters:
    """Tensor bytes that crossed between driver and ranks (each storage counted once per call, not
    once per rank), and the pickles' own size. Read through ``DistributedRunner.transfer_stats()``."""

    calls: int = 0
    tensor_bytes_sent: int = 0
    tensors_sent: int = 0
    tensors_resident: int = 0  # storages a call named by reference: the ranks already held them
    pickle_bytes_sent: int = 0
    tensor_bytes_received: int = 0
    tensors_received: int = 0

    def sent(self, outbound: Outbound, pickle_bytes: int) -> None:
        self.calls += 1
        self.tensor_bytes_sent += outbound.tensor_bytes
        self.tensors_sent += outbound.tensors
        self.tensors_resident += outbound.refs
        self.pickle_bytes_sent += pickle_bytes

    def received(self, nbytes: int, count: int) -> None:
        self.tensor_bytes_received += nbytes
        self.tensors_received += count


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a started pool, from ``DistributedRunner.stats()``."""

    state: str  # starting, ready, recovering, broken, stopping or closed
    world_size: int
    address: str  # where ranks (and agents) connect
    store_port: int | None  # the rendezvous store's TCP port (None until it listens)
    template_pid: int | None  # this machine's template process (None across hosts)
    rank_pids: dict[int, int]
    hosts: dict[str, list[int]]
    recoveries: int  # recovery episodes so far
    last_recovery_seconds: float | None
    calls: int  # calls sent (keepalives included)
    queued: int  # calls waiting behind the running one
    rejected_messages: int  # frames that failed verification (forged, replayed, malformed) and were dropped
    refused_clients: int  # CURVE handshakes refused: the allow-list, or another pool's keys (TCP with a key file)


class Pool:
    """One started pool. Created by ``DistributedRunner.start``; dead after :meth:`close`."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.world_size = config.world_size
        # A multi-host pool shares its signing key with the agents through the key file.
        self.key = config.curve.hmac_key if config.curve is not None else protocol.new_key()
        self.state = PoolState.STARTING
        self.broken: BaseException | None = None
        self._ipc_dir: str | None = None
        # Across hosts, more ZMQ I/O threads: CURVE-encrypting a large tensor frame for one rank
        # (measured here: ~40 MB/s per connection) must not queue the agents' heartbeats behind it;
        # connections go to the least-loaded thread.
        self._context = zmq.Context(io_threads=4 if config.nodes is not None else 1)
        self._auth: Any = None
        if config.curve is not None:
            from lightdist.keys import AllowListAuthenticator

            self._auth = AllowListAuthenticator(self._context, config.curve.allowed_clients).start()
        self.session = Session(self.key, sender=DRIVER_SENDER, rank=protocol.DRIVER_RANK)
        self.session.peers = set()
        address = config.worker_address
        if address is None:
            self._ipc_dir = private_ipc_dir()
            address = f"ipc://{self._ipc_dir}/pool.sock"
        if config.nodes is not None:
            self.session.newcomer_prefix = AGENT_PREFIX  # agents introduce themselves (HELLO)
        try:
            self.channel, self.address = Channel.bind_router(
                self._context, address, self.session, curve=config.curve, max_frame_bytes=config.max_frame_bytes
            )
        except BaseException:
            if self._auth is not None:
                self._auth.stop()
            self._context.destroy(linger=0)
            remove_ipc_dir(self._ipc_dir)
            raise
        if self._auth is not None:
            self._auth.watch(self.channel.socket, self.address)  # refused handshakes are logged
        if config.worker_address is not None:  # TCP: frames signed with another key are logged too
            refusals = self._auth.refusals if self._auth is not None else RefusalLog()
            self.channel.on_rejected = signature_refusal(refusals, self.address)
        self.placement: LocalPlacement | AgentPlacement = (
            LocalPlacement(config.world_size)
            if config.nodes is None
            else AgentPlacement(
                self.channel,
                config.world_size,
                config.nodes,
                config.host_names,
                config.host_timeout,
                list(config.imports),
                config.cwd,
                self.address,
                config.rehost_timeout,
                key_file=None if config.curve is None else str(config.curve.path),
            )
        )
        self.recovery = Recovery(config.world_size, timeout=1800.0)
        # How tensors travel (see lightdist._tensors): shared memory on this host until a rank says it
        # cannot open the driver's memfd or the driver cannot read a rank (READY reports), frames else.
        local = config.nodes is None and config.tensor_transport != FRAMES
        self.transports = (SHM, VM) if local else (FRAMES, FRAMES)
        self._shm_probe = _shm.MemFile(_shm.PAGE, "lightdist-probe") if local else None
        self.resident = ResidentSet()
        self.transfers = TransferCounters()
        self._senders: dict[int, str] = {}  # rank -> sender name (= ZMQ identity) of its live process
        self._incarnation = collections.Counter[int]()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._queue: collections.deque[PendingCall] = collections.deque()
        self.current: PendingCall | None = None
        self.startup = PendingCall(id=0, pending=set(range(self.world_size)))
        self._store: Any = None
        self._start_timeout = 1800.0
        self._idle_death: WorkerDiedError | None = None  # reported to the next call
        self._last_activity = time.monotonic()
        self._io_stop = False
        self._leader: int | None = None  # ident of the blocking caller receiving for the pool
        self._io_waker = Waker()  # wakes the I/O thread out of standby
        self._thread = threading.Thread(target=self._run, name="lightdist-io", daemon=True)
        self._thread.start()

    # --- start -----------------------------------------------------------------------------------
    def launch(self, start_timeout: float) -> None:
        """Spawn the template, host the store and fork every rank; READY/FAILED arrive on ``startup``.

        Across hosts, host the store only: ranks are spawned once the hosts' agents attached
        (see :mod:`lightdist._attach`)."""
        cfg = self.config
        self._start_timeout = start_timeout
        self.recovery.timeout = start_timeout
        if isinstance(self.placement, LocalPlacement):
            self.placement.start(
                TemplateProcess(
                    list(cfg.imports), cfg.cwd, self._rank_exited, self._template_lost, cleanup_dir=self._ipc_dir
                )
            )
        import torch.distributed as dist  # after the template started: both import in parallel

        # torch's TCPStore listens on every interface whatever host it is given; the store is
        # unauthenticated, so it gets a socket bound to the pool's address alone, passed in by fd.
        listener = _listen(cfg.master_addr, cfg.master_port or 0)
        try:
            self._store = dist.TCPStore(  # type: ignore[attr-defined]
                cfg.master_addr,
                listener.getsockname()[1],
                None,
                True,
                wait_for_workers=False,
                use_libuv=True,
                master_listen_fd=listener.fileno(),
            )
        except BaseException:
            listener.close()
            raise
        listener.detach()  # the store owns the fd now and closes it; closing it here too could hit a reused fd
        with self._lock:
            if isinstance(self.placement, AgentPlacement):
                self.placement.store_up = True
                self._apply(self.placement.try_form(self.state))  # agents may have said HELLO already
            else:
                self._spawn_ranks(list(range(self.world_size)))
        self._io_waker.wake()  # start the heartbeat timer

    def _boot(self, rank: int, sender: str) -> RankBoot:
        """Rank ``rank``'s bootstrap for one life; a remote host adjusts its local layout."""
        cfg = self.config
        probe = None if self._shm_probe is None else (self._shm_probe.pid, self._shm_probe.fd)
        return RankBoot(
            rank=rank,
            world_size=cfg.world_size,
            local_rank=rank,
            local_world_size=cfg.world_size,
            sender=sender,
            driver_seq=self.session.seq,
            key=self.key,
            address=self.address,
            store_host=cfg.master_addr,
            store_port=self._store.port,
            store_prefix=self.recovery.store_prefix,
            start_timeout=self._start_timeout,
            pg_timeout=cfg.pg_timeout,
            accelerator=cfg.accelerator,
            backend=cfg.backend,
            worker_cls=cfg.worker_cls,
            setup_kwargs=cfg.setup_kwargs,
            cwd=cfg.cwd,
            sys_path=cfg.sys_path,
            argv=tuple(sys.argv),
            shm_probe=probe,
            max_frame_bytes=cfg.max_frame_bytes,
            stream_window=cfg.stream_window,
        )

    def _spawn_ranks(self, ranks: list[int]) -> None:
        self.placement.claim(ranks)  # ranks of a lost host go to a spare, if there is one
        for rank in ranks:
            host = self.placement.host_of(rank)
            if host is not None:  # else it waits for a host (the placement says so, once per wait)
                self._spawn(rank, host)

    def _spawn(self, rank: int, host: RankHost) -> None:
        self._incarnation[rank] += 1
        # The sender name is also the ZMQ identity: a random part keeps a local client from taking
        # the name first (a ROUTER ignores a second peer with an identity already in use).
        sender = f"r{rank}.{self._incarnation[rank]}.{secrets.token_hex(8)}"
        old = self._senders.get(rank)  # accept the new sender before it can possibly send
        if old is not None:
            self.channel.forget(old)
        self._senders[rank] = sender
        self.channel.accept_from(sender)
        try:
            host.spawn(rank, self._boot(rank, sender))
        except OSError as exc:  # the template is gone; its monitor reports why
            self._on_broken(RuntimeError(f"cannot start rank {rank}: the template process is gone ({exc})"))

    def startup_event(self, event: Event) -> bool:
        """Consume one start-up event (raising a failure); True once every rank is READY."""
        if event.kind == ERROR:
            raise event.value
        if event.kind == READY:
            with self._lock:
                self.startup.pending.discard(event.rank)
        return not self.startup.pending

    def start_error(self, exc: BaseException, timeout: float) -> BaseException:
        """What the caller of start() should see for ``exc``: a timeout names what was missing."""
        if not isinstance(exc, TimeoutError):
            return exc
        if not self.placement.formed():
            return TimeoutError(f"the pool did not form within {timeout} s: {self.placement.status()}")
        waiting = sorted(self.startup.pending)
        return TimeoutError(
            f"ranks {waiting} were not ready within {timeout} s (setup still running, or stuck); "
            "every worker process was stopped. Raise start(timeout=...) if setup is slow"
        )

    def mark_ready(self) -> None:
        with self._lock:
            if self.state is PoolState.STARTING:
                self.state = PoolState.READY
                self._last_activity = time.monotonic()
        self._io_waker.wake()  # re-arm the keepalive timer

    # --- calls (any thread) ----------------------------------------------------------------------
    def submit(
        self,
        frames: list[Any],
        streaming: bool,
        internal: bool = False,
        outbound: Outbound | None = None,
        resident_serial: int | None = None,
    ) -> PendingCall:
        """Queue a call; if the pool is idle its CALL leaves from this thread right away."""
        call = PendingCall(
            id=next(self._ids),
            streaming=streaming,
            frames=frames,
            internal=internal,
            outbound=outbound,
            resident_serial=resident_serial,
        )
        if streaming:
            credit = _Credit(self, call)
            call.on_consumed = credit.consumed
        if outbound is not None:
            self.transfers.sent(outbound, len(frames[1]))
        with self._lock:
            missing = self.placement.missing() if self.state.serving else None
            if self._idle_death is not None:  # a rank died while idle: this call hears of it
                call.push(Event(ERROR, self._idle_death))
                call.finished.set()
                self._idle_death = None
            elif missing is not None:  # a lost host's ranks have no host: it would wait for one
                call.push(Event(ERROR, missing))
                call.finished.set()
            elif self.state.serving:
                self._queue.append(call)
                self._dispatch()
            else:
                call.push(Event(ERROR, self._not_ready_error()))
                call.finished.set()
        return call

    def interrupt(self, call: PendingCall, patient: bool = False) -> None:
        """Ask the ranks to stop ``call`` (they see ``cancelled``) but still deliver its reply:
        cooperative code returns what it has (an interrupted fit returns its state so far). Ranks
        still in the call after the grace period are replaced and the caller gets TimeoutError.

        ``patient``: nobody is replaced for being slow (a training step may take minutes); the
        grace period starts only once some rank has left the call, as for :meth:`cancel`."""
        with self._lock:
            if call is not self.current or call.finished.is_set():
                return
            if not patient:
                self._stop_running(call)
                return
            call.patient = True
            live = call.pending - self.recovery.dead
            if live:
                self._send_to(Kind.CANCEL, call.id, [], live)
            if len(call.pending) < self.world_size and call.failed_at is None:
                call.failed_at = time.monotonic()  # some rank already left the call
                self._io_waker.wake()

    def cancel(self, call: PendingCall) -> None:
        """The caller gave up on ``call`` (timeout, task cancelled, Ctrl-C, stream closed).

        As in fal.distributed, the ranks finish their call: they see ``cancelled`` and may return
        early, and nobody is killed for being slow. Only once a rank has left the call do the
        others get ``grace_period`` seconds: a rank still inside after that is wedged in a
        collective its peers will never join, and is replaced (see _on_reply, _grace_timer)."""
        with self._lock:
            if call.finished.is_set() or call.cancelled:
                return
            call.cancelled = True
            if call is self.current:
                live = call.pending - self.recovery.dead
                if live:
                    self._send_to(Kind.CANCEL, call.id, [], live)
                if len(call.pending) < self.world_size and call.failed_at is None:
                    call.failed_at = time.monotonic()  # some rank already left the call
                    self._io_waker.wake()
            elif call in self._queue:
                self._queue.remove(call)
                call.finished.set()

    # --- I/O thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug here must fail calls loudly, not hang them
            log.exception("lightdist I/O thread crashed")
            with self._lock:
                self._on_broken(RuntimeError(f"the pool's I/O thread crashed: {exc!r}"))

    def _serve(self) -> None:
        while not self._io_stop:
            if self._leader is not None:  # a blocking caller receives; stand by until it leaves
                select.select([self._io_waker.fd], [], [])
                self._io_waker.clear()
                continue
            with self._lock:  # drain and route as one step: see _receive
                messages_in = self._receive()
                timeout = self._tick()
            if not messages_in:
                self.channel.wait(timeout, extra=[self._io_waker.fd])
                self._io_waker.clear()

    def wait_event(self, call: PendingCall, deadline: float | None, lead: bool = True) -> Event:
        """The next event of ``call`` for a blocking caller (interruptible by Ctrl-C).

        Leader/follower: if nobody else is receiving, this thread becomes the receiver and routes
        every arriving message (its own reply included) itself; the I/O thread resumes when it
        leaves. Otherwise it waits for whoever receives to push its events and wake it. With
        ``lead=False`` it never receives: a caller that Ctrl-C may interrupt anywhere must not hold
        messages it has drained but not yet routed.
        """
        event = call.pop_nowait()
        if event is not None:
            return event
        me = threading.get_ident()
        waker = thread_waker()
        call.waker = waker
        try:
            while True:
                event = call.pop_nowait()
                if event is not None:
                    return event
                with self._lock:
                    if lead and self._leader is None and not self._io_stop:
                        self._leader = me
                    leading = self._leader == me
                fds = [waker.fd]
                timer = None
                if leading:
                    with self._lock:
                        received = self._receive()
                        timer = self._tick()  # the I/O thread stands by: its timers are ours
                    if received:
                        continue
                    # channel.waker: a send by another thread may have eaten our edge
                    fds += [self.channel.fd, self.channel.waker.fd]
                left = remaining(deadline)
                if left == 0:
                    raise TimeoutError
                if timer is not None:
                    left = timer if left is None else min(left, timer)
                select.select(fds, [], [], left)
                waker.clear()
                if leading:
                    self.channel.waker.clear()
        finally:
            call.waker = None
            with self._lock:
                released = self._leader == me
                if released:
                    self._leader = None
            if released:
                self._io_waker.wake()

    # --- timers (under _lock) ---------------------------------------------------------------------
    def _tick(self) -> float | None:
        """Run the timers that are due; seconds until the next one (None: none armed)."""
        now = time.monotonic()
        events, heartbeat = self.placement.tick(now, self.state)
        self._apply(events)
        due = [
            self._held_error_timer(now),
            self._grace_timer(now),
            self._recovery_timer(now),
            heartbeat,
            self._keepalive_timer(now),
        ]
        armed = [d for d in due if d is not None]
        return min(armed) if armed else None

    def _held_error_timer(self, now: float) -> float | None:
        """A collective's error held back in case a death explains it (see _on_reply)."""
        call = self.current
        if call is None or call.held is None or call.failed:
            return None
        until, longest, err = call.held
        if now < until:
            return until - now
        if now < longest and not self.placement.probed():
            return longest - now  # a host's answer re-runs this timer (_tick follows every receive)
        self._fail(call, err)  # no death explained it: the error stands
        return None

    def _grace_timer(self, now: float) -> float | None:
        """Ranks still running a failed call (or one their peers left) after the grace period are stuck."""
        call = self.current
        if call is None or call.failed_at is None or not call.pending:
            return None
        expires = call.failed_at + self.config.grace_period
        if now < expires:
            return expires - now
        stuck = sorted(call.pending)
        self._kill(call.pending, "still inside a failed or abandoned call after the grace period")
        call.pending.clear()
        if not call.failed and not call.cancelled:  # an interrupted call whose caller still waits for its reply
            call.failed = True
            call.push(
                Event(
                    ERROR,
                    TimeoutError(
                        f"ranks {stuck} did not stop within the grace period "
                        f"({self.config.grace_period} s) and were replaced"
                    ),
                )
            )
        self._finish(call)
        return None

    def _recovery_timer(self, now: float) -> float | None:
        if self.state is not PoolState.RECOVERING or self.recovery.deadline is None:
            return None
        if not self.recovery.expired(now):
            return self.recovery.deadline - now
        missing = self.placement.missing()
        why = f"ranks {sorted(self.recovery.pending)} never reported back" if missing is None else str(missing)
        self._on_broken(
            RuntimeError(f"recovery did not finish within {self._start_timeout:.0f} s ({why}); call start() again")
        )
        return None

    def _keepalive_timer(self, now: float) -> float | None:
        interval = self.config.keepalive_interval
        if interval is None or self.state is not PoolState.READY or self.current is not None or self._queue:
            return None
        if now - self._last_activity < interval:
            return self._last_activity + interval - now
        frames, outbound = encode_call(self.config.keepalive_payload, False, self.config.cwd, self.transports)
        self._queue.append(PendingCall(id=next(self._ids), frames=frames, internal=True, outbound=outbound))
        self._last_activity = now
        self._dispatch()
        return None

    # --- routing (under _lock) -------------------------------------------------------------------
    def _not_ready_error(self) -> BaseException:
        if self.state is PoolState.BROKEN and self.broken is not None:
            return self.broken
        if self.state is PoolState.STARTING:
            return PoolClosedError("the pool is still starting; call it once start() has returned")
        return PoolClosedError(f"the pool is {self.state.value}; call start() first")

    def is_alive(self) -> bool:
        return self.state.serving

    def idle_seconds(self) -> float | None:
        """Seconds since the last call (or start) ended; None while a call runs or waits, or while
        the pool starts or recovers."""
        with self._lock:
            if self.state is not PoolState.READY or self.current is not None or self._queue:
                return None
            return time.monotonic() - self._last_activity

    def _dispatch(self) -> None:
        while self.current is None and self._queue and self.state is PoolState.READY:
            call = self._queue.popleft()
            if call.cancelled:  # gave up while queued: never ran
                call.finished.set()
                continue
            self.current = call
            call.pending = set(range(self.world_size))
            bulk = call.outbound.buffers if call.outbound is not None else ()
            self._send_to(Kind.CALL, call.id, call.frames, bulk=bulk)

    def _send_to(
        self, kind: Kind, call: int, payload: list[bytes], ranks: set[int] | None = None, bulk: Sequence[Any] = ()
    ) -> None:
        # Signed once, the same bytes to every rank (a large payload is hashed once, not N times).
        targets = sorted(ranks if ranks is not None else self._senders)
        self.channel.send(kind, call, payload, to=[self._senders[r].encode() for r in targets], bulk=bulk)

    def _receive(self) -> int:
        """Drain the socket and route every message; caller holds ``_lock``.

        Draining and routing must be one step under the pool lock: when the receiving role passes
        between the I/O thread and a leading caller, two batches drained back to back would
        otherwise be routed in either order, and stream items would arrive out of order.
        """
        drained = self.channel.drain()
        for _, msg in drained:
            self._on_message(msg)
        return len(drained)

    def _on_message(self, msg: Message) -> None:
        try:
            self._route(msg)
        except (IndexError, ValueError, TypeError, KeyError, EOFError, AttributeError, ImportError) as exc:
            # Signed, so from one of our processes, but not what its kind promises: a bug to report,
            # never a reason to stop serving.
            log.warning("dropped a malformed %s from %s: %r", msg.kind.name, msg.header.sender, exc)

    def _route(self, msg: Message) -> None:
        h = msg.header
        if h.sender.startswith(AGENT_PREFIX):
            self._apply(self.placement.on_message(msg, self.state))
            return
        if self._senders.get(h.rank) != h.sender:
            return  # a previous life of this rank
        kind, call = h.kind, self.current
        if kind is Kind.STREAM_ITEM:
            if call is not None and call.id == h.call and h.rank == 0 and not call.failed:
                call.push(Event(ITEM, msg.payload[0]))
        elif kind in (Kind.RESULT, Kind.ERROR):
            if call is not None and call.id == h.call:
                self._on_reply(call, h.rank, kind, msg.payload, msg.bulk)
        elif kind is Kind.TAKEN:
            if call is not None and call.id == h.call:
                call.taken.add(h.rank)
                if call.outbound is not None and len(call.taken) == self.world_size:
                    call.outbound.release()  # every rank mapped or copied them: free the memfd now
        elif kind in (Kind.READY, Kind.REBUILT, Kind.FAILED):
            self._on_rank_report(h.rank, h.call, kind, msg.payload)

    def _on_rank_report(self, rank: int, call: int, kind: Kind, payload: tuple[bytes, ...]) -> None:
        """READY, REBUILT or FAILED: a rank finished starting or rebuilding its group."""
        if kind is Kind.READY and payload:
            self._on_reach_report(rank, messages.decode_reach(payload[0]))
        failure = messages.decode_error(rank, payload[0])[0] if kind is Kind.FAILED else None
        if self.state is PoolState.STARTING:
            self.startup.push(Event(ERROR, failure, rank=rank) if failure else Event(READY, None, rank=rank))
        elif self.state is PoolState.RECOVERING and (kind is not Kind.REBUILT or call == self.recovery.generation):
            if failure is not None:
                self._on_broken(RuntimeError(f"the pool could not recover: {failure}"))
            elif self.recovery.reported(rank):
                self.state = PoolState.READY
                log.info("pool recovered in %.2f s", self.recovery.last_seconds)
                self._dispatch()

    def _on_reply(
        self, call: PendingCall, rank: int, kind: Kind, payload: tuple[bytes, ...], bulk: tuple[Any, ...] = ()
    ) -> None:
        call.pending.discard(rank)
        if kind is Kind.ERROR:
            err, in_collective = messages.decode_error(rank, payload[0])
            call.rebuild = call.rebuild or in_collective
            if call.internal:
                log.warning("keepalive call failed: %s", err)
            if not call.failed and in_collective and call.held is None:
                # A collective that failed on this rank is often the echo of a peer that just died
                # ("connection reset by peer"), and that death may be reported a moment later: hold
                # the error briefly so the caller hears of the cause, not the echo (see _tick).
                # Across hosts a crashed host reports nothing: its peers' gloo connections close at
                # once, but its loss is known only when it misses its heartbeat. So every host is
                # asked for a sign of life, and the error waits until each has answered, or the
                # silent one is declared lost (then the caller gets WorkerDiedError naming it).
                until = time.monotonic() + HOLD_COLLECTIVE_ERROR_S
                call.held = (until, until + self.placement.probe(), err)
                self._io_waker.wake()
            elif not call.failed:
                # The first error fails the call now, even while other ranks still wait in a collective.
                self._fail(call, err)
        elif kind is Kind.RESULT:
            if len(payload) == 1:  # a plain reply: its data frame only (see _rank._run_call)
                payload = (b"", *payload)
                dropped: list[int] = []
                manifest = _PLAIN_MANIFEST
            else:
                dropped, manifest = messages.decode_result_meta(payload[0])
            call.dropped.update(dropped)
            if rank == 0:
                try:
                    ready = self._read_reply_storages(call, manifest)
                except OSError as exc:
                    self._fail(call, RuntimeError(f"cannot read rank 0's result from its memory: {exc}"))
                else:
                    digests = payload[2] if bulk else b""
                    call.reply = (payload[1], manifest, bulk, digests, ready)
        if (call.cancelled or call.patient) and call.failed_at is None and call.pending:
            # A rank left the cancelled call: the others can no longer meet it in a collective.
            call.failed_at = time.monotonic()  # their grace period starts (see _grace_timer)
            self._io_waker.wake()
        if not call.pending:
            self._finish(call)

    def _fail(self, call: PendingCall, err: BaseException) -> None:
        """Deliver ``err`` now; the ranks still running ``call`` are asked to stop, then given
        ``grace_period`` seconds before they are killed (see _grace_timer)."""
        call.failed = True
        call.push(Event(ERROR, err))
        self._stop_running(call)

    def _stop_running(self, call: PendingCall) -> None:
        if call.failed_at is None:
            call.failed_at = time.monotonic()
        live = call.pending - self.recovery.dead
        if live:
            self._send_to(Kind.CANCEL, call.id, [], live)
        self._io_waker.wake()  # arm the grace timer (the I/O thread may be idle or standing by)

    def _finish(self, call: PendingCall) -> None:
        """Every rank replied to ``call`` (or is gone): deliver the result, recover if needed."""
        if call.held is not None and not call.failed:
            call.failed = True
            call.push(Event(ERROR, call.held[2]))
        if call.outbound is not None:
            call.outbound.finish()
        if not call.failed and not call.cancelled and call.reply is not None:
            data, manifest, buffers, digests, ready = call.reply
            call.push(
                Event(
                    RESULT,
                    Reply(data, manifest, buffers, digests, ready, call.resident_serial, frozenset(call.dropped)),
                )
            )
        elif not call.failed and not call.cancelled:
            call.push(Event(RESULT, None))
        if call.resident_serial is not None and (call.failed or call.cancelled or call.reply is None):
            self.resident.invalidate()  # the ranks' copies are in doubt after a failed resident call
        call.finished.set()
        self.current = None
        self._last_activity = time.monotonic()
        if self.recovery.dead or call.rebuild:
            self._recover()
        self._dispatch()

    # --- hosts and failures (under _lock, or from the monitor thread) ----------------------------
    def _apply(self, events: list[PlacementEvent]) -> None:
        """Act on what the placement reports about its hosts."""
        for event in events:
            if isinstance(event, SpawnRanks):
                self._spawn_ranks(event.ranks)
            elif isinstance(event, RankExited):
                self._ranks_exited([event.info])
            elif isinstance(event, HostLost):
                # One failure for all of them; a rank whose exit was already reported is skipped
                # (its sender was replaced, or it is dead already).
                self._ranks_exited(
                    [
                        RankExit(rank, event.pids.get(rank, 0), self._senders.get(rank, ""), None, None, event.why)
                        for rank in event.ranks
                        if rank not in self.recovery.dead
                    ],
                    host_lost=True,
                )
            elif isinstance(event, HostsMissing):
                for call in self._queue:  # the running call, if any, ends as its ranks do
                    call.failed = True
                    call.push(Event(ERROR, event.error))
                    call.finished.set()
                self._queue.clear()
            elif isinstance(event, PoolFailed):
                self._on_broken(event.error)

    def _rank_exited(self, info: RankExit) -> None:  # monitor thread
        with self._lock:
            self._ranks_exited([info])

    def _template_lost(self, detail: str) -> None:  # monitor thread
        with self._lock:
            self._on_broken(RuntimeError(f"the pool's template process is gone: {detail}"))

    def _ranks_exited(self, infos: list[RankExit], host_lost: bool = False) -> None:
        """Ranks died together (one process, or every rank of a lost host): one failure event.

        Handled as one so that the ranks of a lost host start one recovery, not one per rank (a
        second death during recovery restarts every rank, and restarts are capped)."""
        if self.state.over:
            return
        # a previous life of a rank (killed by us and replaced) is expected to die
        infos = [info for info in infos if self._senders.get(info.rank) == info.sender]
        if not infos:
            return
        first = infos[0]
        err = WorkerDiedError(first.rank, first.exitcode, first.signal, first.detail)
        if self.state is PoolState.STARTING:
            self.startup.push(Event(ERROR, err))
            return
        ranks = {info.rank for info in infos}
        self.recovery.lost(ranks)
        others = f" (and ranks {sorted(ranks - {first.rank})})" if len(ranks) > 1 else ""
        log.warning("%s%s; recovering the pool", err, others)
        call = self.current
        if self.state is PoolState.RECOVERING:
            # A second failure: start every rank afresh. A lost host does not count towards the cap
            # on restarts (it guards against ranks that die in setup): a torchrun restart takes
            # every worker, each a host, one after the other.
            self._recover(again=True, cause=err, counted=not host_lost)
        elif call is not None:
            call.pending -= ranks
            if not call.failed:
                self._fail(call, err)
            if not call.pending:
                self._finish(call)
        else:
            self._idle_death = err
            self._recover()

    def _kill(self, ranks: set[int], why: str) -> None:
        """SIGKILL the live ones of ``ranks``; they count as lost from now on."""
        self._sigkill(ranks - self.recovery.dead, why)
        self.recovery.lost(ranks)

    def _sigkill(self, ranks: set[int], why: str) -> None:
        killed = []  # one line for all of them: a restart of recovery kills many at once
        for rank in sorted(ranks):
            host = self.placement.host_of(rank)
            pid = host.pids.get(rank) if host is not None else None
            if host is not None and pid is not None:
                host.signal_ranks(signal.SIGKILL, [rank])
                killed.append(f"{rank} (pid {pid} on {host.name})")
        if killed:
            log.warning("killing rank%s %s: %s", "s" if len(killed) > 1 else "", ", ".join(killed), why)

    def _recover(self, again: bool = False, cause: BaseException | None = None, counted: bool = True) -> None:
        """Respawn lost ranks (setup runs again with the original kwargs) and rebuild the group on a
        fresh store prefix; the other ranks keep their state. Calls queue until it is done."""
        step = self.recovery.begin(again, counted)
        if step is None:  # a respawned rank that dies in setup every time would loop forever
            self._on_broken(
                RuntimeError(
                    f"the pool could not recover: ranks kept dying while it restarted them "
                    f"(last: {cause}); fix the cause and call start() again"
                )
            )
            return
        self._sigkill(set(step.kill), "alive when recovery had to start over")
        self.state = PoolState.RECOVERING
        self.resident.invalidate()  # respawned ranks hold nothing; survivors' copies are in doubt
        if step.survivors:
            self._send_to(
                Kind.REBUILD, step.generation, [messages.encode_rebuild(step.store_prefix)], set(step.survivors)
            )
        self._spawn_ranks(step.respawn)
        self._io_waker.wake()  # arm the recovery deadline

    def _on_broken(self, err: BaseException) -> None:
        if self.state in (PoolState.STOPPING, PoolState.CLOSED):
            return
        if self.state is PoolState.STARTING:
            self.startup.push(Event(ERROR, err))
        self.state = PoolState.BROKEN
        self.broken = err
        self._idle_death = None  # superseded: the broken pool's error says more
        self.recovery.abandon()
        self._fail_every_call(err)

    def _fail_every_call(self, err: BaseException) -> list[PendingCall]:
        """Every running and queued call ends with ``err``; returns them (the running one first)."""
        calls = [*([self.current] if self.current else []), *self._queue]
        for call in calls:
            if not call.failed:
                call.failed = True
                call.push(Event(ERROR, err))
            call.finished.set()
        self.current = None
        self._queue.clear()
        return calls

    # --- tensors out of band ------------------------------------------------------------------------
    def _on_reach_report(self, rank: int, report: dict[str, Any]) -> None:
        """A rank's READY says whether it opened the driver's probe memfd and where its own probe
        buffer is: any refusal moves the pool to frames for that direction, for good."""
        to_ranks, from_ranks = self.transports
        if to_ranks == SHM and not report.get("shm"):
            log.info("rank %d cannot open the driver's memfd: tensors travel as frames", rank)
            to_ranks = FRAMES
        if from_ranks == VM and not (report.get("probe") and _shm.probe_report(report["probe"])):
            log.info("the driver cannot read rank %d's memory: results travel as frames", rank)
            from_ranks = FRAMES
        self.transports = (to_ranks, from_ranks)

    def _read_reply_storages(self, call: PendingCall, manifest: dict[str, Any]) -> dict[int, Any]:
        """``vm`` transport: copy rank 0's storages now, while it waits for its next command (the
        next CALL leaves only after this). Write-back storages land in the driver's own tensors."""
        if manifest.get("transport") != VM:
            return {}
        import torch

        ready: dict[int, Any] = {}
        pairs = []
        for index, (kind, key, nbytes, address) in enumerate(manifest["records"]):
            if kind != ADDR:
                continue
            target = None
            if key is not None and call.resident_serial is not None:
                target = self.resident.target(call.resident_serial, key)
            if target is None or target.nbytes() != nbytes:
                target = torch.UntypedStorage(nbytes)  # type: ignore[no-untyped-call]
            ready[index] = target
            pairs.append((target.data_ptr(), address, nbytes))
        _shm.vm_read(manifest["pid"], pairs)
        self.transfers.received(sum(n for _, _, n in pairs), len(pairs))
        return ready

    # --- stop ------------------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        """EXIT → ``timeout`` → SIGTERM → grace → SIGKILL; then release sockets, store and files."""
        with self._lock:
            if self.state in (PoolState.STOPPING, PoolState.CLOSED):
                return  # idempotent: a second close (stop() racing an aborted start) has nothing to do
            was_ready = self.state is PoolState.READY
            # Agents exit 0 when the pool was stopped, 75 when it had failed (a launcher restarts them).
            missing = self.placement.missing()
            if self.state is PoolState.BROKEN:
                self.placement.closing(str(self.broken))
            elif self.state is PoolState.STARTING:
                self.placement.closing("the pool's start did not complete")
            elif missing is not None:
                self.placement.closing(str(missing))
            if self.state is PoolState.STARTING:
                # A start() still waiting for READYs hears of it now, not at its timeout.
                self.startup.push(Event(ERROR, PoolClosedError("the pool was stopped while it started")))
            if self.state is PoolState.RECOVERING:
                # Survivors re-joining the group wait for peers that may never come (a lost host):
                # they cannot see EXIT until then, so waiting the full timeout would only delay stop.
                timeout = min(timeout, self.config.grace_period)
            self.state = PoolState.STOPPING
            running = self.current
            for call in self._fail_every_call(PoolClosedError("the pool was stopped")):
                if call is running:
                    self._send_to(Kind.CANCEL, call.id, [], call.pending)
            if was_ready or self._senders:
                self._send_to(Kind.EXIT, 0, [])
        hosts = self.placement.hosts()
        deadline = time.monotonic() + timeout
        for host in hosts:
            host.wait_ranks_gone(max(0.0, deadline - time.monotonic()))
        stuck = [host for host in hosts if host.pids]
        for host in stuck:
            host.signal_ranks(signal.SIGTERM)
        term_deadline = time.monotonic() + min(2.0, max(timeout, 0.5))
        for host in stuck:
            if not host.wait_ranks_gone(max(0.0, term_deadline - time.monotonic())):
                host.signal_ranks(signal.SIGKILL)
                host.wait_ranks_gone(5.0)
        for host in hosts:
            host.close()
        self._io_stop = True
        self._io_waker.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self.channel.close(linger_ms=self.placement.close_linger_ms())
        self._io_waker.close()
        if self._auth is not None:
            self._auth.stop()
        self._context.term()
        self._store = None
        if self._shm_probe is not None:
            self._shm_probe.close()
        remove_ipc_dir(self._ipc_dir)
        self.state = PoolState.CLOSED

    def kill(self) -> None:
        """Immediate teardown (failed start, interpreter exit): no EXIT, no grace."""
        with self._lock:
            if self.state in (PoolState.STOPPING, PoolState.CLOSED):
                return  # closed already, or closing on another thread
        for host in self.placement.hosts():
            host.signal_ranks(signal.SIGKILL)
        self.close(timeout=0.0)

    # --- views -----------------------------------------------------------------------------------
    def host_ranks(self) -> dict[str, list[int]]:
        """``{host name: ranks}`` of the hosts that hold ranks (spares hold none)."""
        return self.placement.host_ranks()

    def rank_pids(self) -> dict[int, int]:
        pids: dict[int, int] = {}
        for host in self.placement.hosts():
            pids.update(host.pids)
        return pids

    def stats(self) -> PoolStats:
        template = self.placement.template if isinstance(self.placement, LocalPlacement) else None
        store = self._store
        with self._lock:
            return PoolStats(
                state=self.state.value,
                world_size=self.world_size,
                address=self.address,
                store_port=None if store is None else int(store.port),
                template_pid=None if template is None else template.pid,
                rank_pids=self.rank_pids(),
                hosts=self.host_ranks(),
                recoveries=self.recovery.count,
                last_recovery_seconds=self.recovery.last_seconds,
                calls=self.transfers.calls,
                queued=len(self._queue),
                rejected_messages=self.channel.rejected,
                refused_clients=0 if self._auth is None else int(self._auth.denied),
            )


class _Credit:
    """The driver's half of stream flow control for one call: count what the consumer took and
    return it to rank 0 as CREDIT in batches (a quarter window at a time, so one message per many
    items), which lets rank 0's ``add_streaming_result`` go on (see ``_link.StreamWindow``)."""

    def __init__(self, pool: Pool, call: PendingCall) -> None:
        self.pool = pool
        self.call = call
        max_items, max_bytes = pool.config.stream_window
        self.batch_items = max(1, max_items // 4)
        self.batch_bytes = max(1, max_bytes // 4)
        self.items = 0
        self.bytes = 0

    def consumed(self, nbytes: int) -> None:  # the consumer's thread
        self.items += 1
        self.bytes += nbytes
        if self.items < self.batch_items and self.bytes < self.batch_bytes:
            return
        items, self.items, nbytes, self.bytes = self.items, 0, self.bytes, 0
        pool = self.pool
        with pool._lock:
            call = self.call
            if call is pool.current and not call.finished.is_set() and 0 in call.pending:
                pool._send_to(Kind.CREDIT, call.id, [messages.encode_credit(items, nbytes)], {0})


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` only (port 0: any free one), listening."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(1024)
    except BaseException:
        listener.close()
        raise
    return listener
