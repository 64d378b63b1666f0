"""The rank's side of the command channel (used by :mod:`lightdist._rank`).

Any thread sends directly (the channel serialises sends, so items and the result leave in the
order they were made). Exactly one thread receives at a time: between calls the rank's main thread
waits for the next CALL itself (no hand-off on the way in); while a call runs, the link thread
receives, so CANCEL sets ``cancel_event`` and PING is answered even while ``__call__`` is busy.
"""

from __future__ import annotations

import queue
import select
import threading
from collections.abc import Sequence
from typing import Any

import zmq

from lightdist._messages import decode_credit
from lightdist.errors import PayloadError
from lightdist.protocol import Kind, Message
from lightdist.transport import Channel, Waker

__all__ = ["Link"]

_FINAL_LINGER_MS = 2000  # the last FAILED/EXIT reply must reach the driver before the socket closes


class StreamWindow:
    """Rank 0's flow control for one streaming call: at most ``items`` items and ``nbytes`` bytes
    the caller has not consumed yet. The driver returns credit as its consumer reads (CREDIT), so a
    slow consumer slows the producer instead of filling the driver's memory. Nothing is dropped."""

    def __init__(self, items: int, nbytes: int) -> None:
        self.max_items = items
        self.max_bytes = nbytes
        self._cond = threading.Condition()
        self._items = 0  # sent and not yet credited
        self._bytes = 0

    def reset(self) -> None:
        with self._cond:
            self._items = self._bytes = 0
            self._cond.notify_all()

    def reserve(self, nbytes: int, cancelled: threading.Event) -> bool:
        """Wait for room for one item of ``nbytes`` (an item larger than the window goes alone);
        False if the call was cancelled meanwhile (its items would be discarded anyway)."""
        with self._cond:
            while self._items and (self._items >= self.max_items or self._bytes + nbytes > self.max_bytes):
                if cancelled.is_set():
                    return False
                self._cond.wait(0.25)  # CANCEL also notifies; the timeout is a safety net
            self._items += 1
            self._bytes += nbytes
            return True

    def credit(self, items: int, nbytes: int) -> None:
        with self._cond:
            self._items = max(0, self._items - items)
            self._bytes = max(0, self._bytes - nbytes)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class Link:
    """The rank's side of the channel.

    Any thread sends directly (the channel serialises sends, so items and the result leave in the
    order they were made). Exactly one thread receives at a time: between calls the main thread
    itself waits for the next CALL (no hand-off on the way in); while a call runs, the link thread
    receives, so CANCEL sets ``cancel_event`` and PING is answered even while ``__call__`` is busy.
    """

    def __init__(
        self, channel: Channel, max_frame_bytes: int | None = None, stream_window: tuple[int, int] = (1024, 64 << 20)
    ) -> None:
        self.channel = channel
        self.window = StreamWindow(*stream_window)
        self.max_frame_bytes = max_frame_bytes  # the driver disconnects a peer that sends larger frames
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.cancel_event = threading.Event()
        self.current_call = 0
        self.streaming = False
        self.broken = False
        self._rx_lock = threading.Lock()
        self._cancelled: set[int] = set()  # CANCELs that may arrive before their call begins
        self._main_waker = Waker()
        self._link_waker = Waker()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lightdist-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, kind: Kind, call: int = 0, payload: list[bytes] | None = None, bulk: Sequence[Any] = ()) -> None:
        """Sign and send now; any thread. A frame over the driver's limit raises ``PayloadError``
        here: sent, it would get this rank disconnected and its call would never end."""
        cap = self.max_frame_bytes
        if cap is not None:
            for frame in [*(payload or ()), *bulk]:
                size = memoryview(frame).nbytes
                if size > cap:
                    raise PayloadError(
                        f"a {kind.name} frame of {size} bytes exceeds the pool's max_frame_bytes ({cap}); "
                        "return or stream less at once, use tensors (they travel out of band), or raise "
                        "max_frame_bytes (a TCP channel without key_file is capped at 256 MiB by default)"
                    )
        self.channel.send(kind, call, payload or (), bulk=bulk)

    def next_command(self) -> Message | None:
        """Main thread, between calls: the next CALL or EXIT; None if the channel broke."""
        while True:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self.broken:
                return None
            try:
                self._receive()
                if self.inbox.empty():
                    select.select([self.channel.fd, self._main_waker.fd], [], [])
                    self._main_waker.clear()
            except (zmq.ZMQError, OSError, ValueError):
                return None

    def begin_call(self, call: int, streaming: bool) -> None:
        self.cancel_event.clear()
        self.window.reset()
        self.streaming = streaming
        self.current_call = call
        if call in self._cancelled:
            self.cancel_event.set()
        self._link_waker.wake()  # the link thread receives while the call runs

    def end_call(self) -> None:
        self._cancelled.discard(self.current_call)
        self.current_call = 0

    def close(self) -> None:
        """Stop receiving and close the socket, with a short linger so the last reply leaves."""
        self._stopping = True
        self._link_waker.wake()
        self._thread.join(timeout=10)
        self.channel.close(linger_ms=_FINAL_LINGER_MS)
        self._main_waker.close()
        self._link_waker.close()

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self.current_call == 0:  # idle: the main thread is the receiver
                    select.select([self._link_waker.fd], [], [])
                    self._link_waker.clear()
                    continue
                self._receive()
                self.channel.wait(None, extra=[self._link_waker.fd])
                self._link_waker.clear()
        except (zmq.ZMQError, OSError, ValueError):
            self.broken = True  # the socket is gone: unblock the main thread
            self._main_waker.wake()

    def _receive(self) -> None:
        # Drain and handle as one step, so two batches drained back to back by the two receiving
        # threads (as the role passes between them) are handled in arrival order.
        with self._rx_lock:
            for _, msg in self.channel.drain():
                self._handle(msg)

    def _handle(self, msg: Message) -> None:
        kind = msg.kind
        if kind is Kind.CANCEL:
            self._cancelled.add(msg.header.call)
            if msg.header.call == self.current_call:
                self.cancel_event.set()
                self.window.wake()  # a producer waiting for credit gives up
        elif kind is Kind.CREDIT:
            if msg.header.call == self.current_call:
                self.window.credit(*decode_credit(msg.payload[0]))
        elif kind is Kind.PING:
            self.channel.send(Kind.PONG, msg.header.call)
        elif kind in (Kind.CALL, Kind.EXIT, Kind.REBUILD):
            self.inbox.put(msg)
            self._main_waker.wake()
