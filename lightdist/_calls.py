"""``PendingCall``: one call (or the pool's start-up) as the driver tracks it.

Whichever thread is receiving for the pool (the I/O thread, or a blocking caller that leads, see
``Pool.wait_event``) pushes events (stream items, the result, an error) as frames arrive. One
consumer reads them: a blocking thread (:meth:`PendingCall.next`, or ``Pool.wait_event`` with
:attr:`PendingCall.waker`) or a coroutine on any event loop (:meth:`PendingCall.anext`). Events
are buffered without bound, so a slow consumer delays nothing and loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightdist import _messages as messages
from lightdist import protocol
from lightdist._tensors import Outbound, encode
from lightdist.transport import Waker, remaining

if TYPE_CHECKING:
    from lightdist._resident import ResidentSet

__all__ = ["Event", "PendingCall", "Reply", "encode_call"]

# Event kinds seen by the consumer. ``item``, ``ready`` carry data; the others end the call.
ITEM = "item"
READY = "ready"
RESULT = "result"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reply:
    """Rank 0's RESULT, as routed: the pickled value, its tensor manifest and frames, and the
    storages already read from rank 0 (``vm`` transport) by slot index."""

    data: Any
    manifest: dict[str, Any]
    buffers: tuple[Any, ...]
    digests: bytes  # the signed digests of ``buffers``: check them before use
    ready: dict[int, Any]
    resident_serial: int | None
    dropped: frozenset[int]


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    value: Any = None
    rank: int = 0


@dataclass(eq=False)
class PendingCall:
    id: int
    streaming: bool = False
    frames: list[bytes] = field(default_factory=list)  # the signed-once CALL payload
    internal: bool = False  # keepalive: nobody consumes it
    # I/O-thread state
    pending: set[int] = field(default_factory=set)  # ranks that have not replied yet
    reply: tuple[Any, dict[str, Any], tuple[Any, ...], bytes, dict[int, Any]] | None = None  # rank 0's RESULT
    failed: bool = False  # a terminal error was already delivered
    cancelled: bool = False
    patient: bool = False  # interrupted without a deadline: the grace starts only once a rank has left
    failed_at: float | None = None  # when it failed or was cancelled: the grace period starts
    rebuild: bool = False  # an error came from inside torch.distributed: rebuild the group after
    # a collective's error, held until the first time, or the second while hosts have not answered
    held: tuple[float, float, BaseException] | None = None
    outbound: Outbound | None = None  # the payload's out-of-band storages, freed once every rank took them
    resident_serial: int | None = None  # a resident call: its serial in the pool's ResidentSet
    taken: set[int] = field(default_factory=set)  # ranks that sent TAKEN
    dropped: set[int] = field(default_factory=set)  # resident keys some rank dropped (see RankCache.end)
    on_consumed: Callable[[int], None] | None = None  # the consumer took an item of this many bytes

    def __post_init__(self) -> None:
        self._events: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self.finished = threading.Event()  # every rank accounted for; the pool moved on
        self.waker: Waker | None = None  # set while a blocking consumer waits in select()

    def push(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify()
            waiter, self._waiter = self._waiter, None
        waker = self.waker
        if waker is not None:
            waker.wake()
        if waiter is not None:
            loop, fut = waiter
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:
                pass  # that loop is closed; nobody is waiting any more

    def pop_nowait(self) -> Event | None:
        with self._cond:
            event = self._events.popleft() if self._events else None
        return self._consumed(event) if event is not None else None

    def _consumed(self, event: Event) -> Event:
        """An item left the buffer: tell the producer it has room (see ``Pool._credit``)."""
        if event.kind == ITEM and self.on_consumed is not None:
            self.on_consumed(len(event.value))
        return event

    def next(self, deadline: float | None) -> Event:
        """The next event; blocks (interruptible by Ctrl-C) until ``deadline``, then TimeoutError."""
        with self._cond:
            while not self._events:
                left = remaining(deadline)
                if left == 0:
                    raise TimeoutError
                self._cond.wait(left)
            event = self._events.popleft()
        return self._consumed(event)

    async def anext(self, deadline: float | None) -> Event:
        """Like :meth:`next` without blocking the running event loop."""
        loop = asyncio.get_running_loop()
        while True:
            event = self.pop_nowait()
            if event is not None:
                return event
            with self._cond:
                if self._events:
                    continue  # pushed between the two looks: take it
                fut: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, fut)
            try:
                left = remaining(deadline)
                if left == 0:
                    raise TimeoutError
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:  # a distinct class before Python 3.11
                raise TimeoutError from None
            finally:
                with self._cond:
                    if self._waiter is not None and self._waiter[1] is fut:
                        self._waiter = None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def encode_call(
    payload: Mapping[str, Any],
    streaming: bool,
    cwd: str | None,
    transports: tuple[str, str],
    resident: ResidentSet | None = None,
) -> tuple[list[Any], Outbound]:
    """The CALL frames every rank receives: an envelope of plain data (streaming flag, the driver's
    sys.path and cwd, the manifest of the tensors' storages and how replies send theirs), the
    cloudpickled keyword arguments with tensors out of band, then one frame per storage when the
    storages travel as frames. ``transports``: (driver → ranks, ranks → driver)."""
    outbound = encode(dict(payload), transports[0], resident)
    envelope = messages.encode_envelope(streaming, cwd, outbound.manifest, transports[1])
    frames = [envelope, outbound.data]
    if outbound.buffers:  # frames transport: signed through their digests (see protocol.bulk_digests)
        frames.append(protocol.bulk_digests(outbound.buffers))
    return frames, outbound
