"""ZMQ channels with deadlines: the driver's ROUTER, each rank's DEALER, and a waker for I/O threads.

A :class:`Channel` is one socket plus the :class:`~lightdist.protocol.Session` that signs and checks
its frames. Like every ZMQ socket it belongs to exactly one thread (the I/O thread of its process);
other threads hand it work through a queue and :class:`Waker`. Sockets close with linger 0 and
:meth:`Channel.close` is safe to call twice.

Frames that fail verification are dropped and counted, never raised into the I/O loop: a rogue
local client must not be able to stop the pool by sending garbage.
"""

from __future__ import annotations

import os
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from lightdist.errors import ProtocolError
from lightdist.protocol import Kind, Message, Session

_BULK_MIN = 1 << 16  # frames this large are received as zmq frames, not copied into bytes
# Plain ints, not pyzmq's enums: enum arithmetic costs microseconds per frame on the hot path.
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)

__all__ = ["Channel", "Waker", "deadline_after", "private_ipc_dir", "remaining", "thread_waker"]


def deadline_after(timeout: float | None) -> float | None:
    """Absolute ``time.monotonic()`` deadline for ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline``; 0 once expired (never negative), None without deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def private_ipc_dir() -> str:
    """A fresh ``0700`` directory for the pool's ``ipc://`` socket: other users cannot connect."""
    path = tempfile.mkdtemp(prefix="lightdist-")
    os.chmod(path, 0o700)
    return path


def remove_ipc_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


class Waker:
    """Wakes a thread blocked in ``zmq.Poller.poll`` from any other thread (an eventfd or a pipe)."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._r = self._w = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self._r, self._w = os.pipe()
            os.set_blocking(self._r, False)
        self.fd = self._r
        self._closed = False

    def wake(self) -> None:
        try:
            if self._r == self._w:
                os.eventfd_write(self._w, 1)
            else:  # pragma: no cover
                os.write(self._w, b"x")
        except (OSError, ValueError):
            pass  # closed or full: the reader is awake (or gone) either way

    def clear(self) -> None:
        try:
            if self._r == self._w:
                os.eventfd_read(self._r)
            else:  # pragma: no cover
                while os.read(self._r, 4096):
                    pass
        except (BlockingIOError, OSError):
            pass

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in {self._r, self._w}:
            try:
                os.close(fd)
            except OSError:
                pass


_local = threading.local()


def thread_waker() -> Waker:
    """This thread's own waker, made once and reused (closed when the thread is gone)."""
    waker = getattr(_local, "waker", None)
    if waker is None:
        waker = _local.waker = Waker()
    return waker


class Channel:
    """A socket and its session, shared by threads with one rule: any thread may send, one receives.

    Sends are serialised by a lock (which also keeps sequence numbers in send order), so a caller
    thread sends its CALL, or a rank's main thread its RESULT, without handing off to another thread.
    The receiving thread waits on :attr:`fd` (the socket's edge-triggered ``ZMQ_FD``) and calls
    :meth:`drain`. Edge-triggered means a send may consume the readiness signal of a message that
    arrived meanwhile; so after every send we look at ``ZMQ_EVENTS`` and wake the receiver (through
    :attr:`waker`) if input is waiting. ``recv`` is a blocking helper for single-threaded use (tests).
    """

    def __init__(self, socket: zmq.Socket[bytes], session: Session, routed: bool) -> None:
        self.socket = socket
        self.session = session
        self.routed = routed  # ROUTER: frames carry the peer's identity first
        self.fd = int(socket.getsockopt(zmq.FD))
        self.waker = Waker()
        self.rejected = 0  # frames dropped by verification
        self.last_rejection = ""
        # Told of each dropped frame (the receiving thread, under the channel lock): the driver logs
        # frames signed with another key (see lightdist._refusals).
        self.on_rejected: Callable[[bytes | None, ProtocolError], None] | None = None
        self._lock = threading.Lock()
        self._buffered: list[tuple[bytes | None, Message]] = []  # drained but not yet returned by recv()

    @classmethod
    def bind_router(
        cls,
        context: zmq.Context[zmq.Socket[bytes]],
        address: str,
        session: Session,
        curve: Any = None,
        max_frame_bytes: int | None = None,
    ) -> tuple[Channel, str]:
        """``curve``: the driver's :class:`~lightdist.keys.DriverKeys` (a TCP pool); the context must
        already have its allow-list authenticator. ``max_frame_bytes``: a peer announcing a larger
        frame is disconnected by ZMQ before the frame is read (nothing is allocated for it)."""
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if max_frame_bytes is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        if curve is not None:
            from lightdist.keys import secure_server

            secure_server(sock, curve)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send raises instead of vanishing
        sock.setsockopt(zmq.RCVHWM, 0)  # the driver drains continuously; never drop stream items
        sock.setsockopt(zmq.SNDHWM, 0)
        if address.startswith("tcp://") and address.rsplit(":", 1)[-1] in ("0", "*"):
            port = sock.bind_to_random_port(address.rsplit(":", 1)[0])
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            sock.bind(address)
        return cls(sock, session, routed=True), address

    @classmethod
    def connect_dealer(
        cls,
        context: zmq.Context[zmq.Socket[bytes]],
        address: str,
        identity: bytes,
        session: Session,
        curve: Any = None,
        before_connect: Any = None,
    ) -> Channel:
        """``curve``: a :class:`~lightdist.keys.ClientKeys` for a driver that requires CURVE;
        ``before_connect(socket)`` runs just before ``connect`` (a socket monitor must be attached
        by then to see the handshake)."""
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            from lightdist.keys import secure_client

            secure_client(sock, curve)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.SNDHWM, 0)  # stream items queue in the socket rather than block a sender
        sock.setsockopt(zmq.RCVHWM, 0)
        if before_connect is not None:
            before_connect(sock)
        sock.connect(address)
        return cls(sock, session, routed=False)

    def accept_from(self, sender: str) -> None:
        with self._lock:
            self.session.accept_from(sender)

    def forget(self, sender: str) -> None:
        with self._lock:
            self.session.forget(sender)

    def send(
        self,
        kind: Kind,
        call: int = 0,
        payload: Sequence[bytes] = (),
        to: Sequence[bytes] = (),
        bulk: Sequence[Any] = (),
    ) -> None:
        """Sign once and send; on a ROUTER, to each identity in ``to``. Any thread. ``bulk``: large
        frames outside the MAC (see :meth:`Session.pack`), sent without a copy.

        A peer that is gone raises ``zmq.ZMQError`` (EHOSTUNREACH) from a ROUTER; it is skipped here,
        since the process monitor reports the death with its exit status.
        """
        with self._lock:
            frames = self.session.pack(kind, call, payload, bulk)
            if not self.routed:
                _send_frames(self.socket, frames)
            for ident in to:
                try:
                    _send_frames(self.socket, [ident, *frames])
                except zmq.ZMQError:
                    pass
            if self._readable():
                self.waker.wake()  # we may have eaten the receiver's edge

    def _readable(self) -> bool:
        return bool(self.socket.getsockopt(_EVENTS) & _POLLIN)  # type: ignore[operator]  # EVENTS is an int

    def drain(self) -> list[tuple[bytes | None, Message]]:
        """Every verified message waiting now (receiving thread only). Rejected frames are counted."""
        out = []
        with self._lock:
            while self._readable():
                # Large frames stay zmq's (no copy in this thread, which must keep heartbeats going).
                raw = self.socket.recv_multipart(_NOBLOCK, copy=False)
                frames: list[Any] = [f.bytes if len(f) < _BULK_MIN else f for f in raw]
                ident = raw[0].bytes if self.routed else None
                try:
                    out.append((ident, self.session.unpack(frames[1:] if self.routed else frames)))
                except ProtocolError as exc:
                    self.rejected += 1
                    self.last_rejection = str(exc)
                    if self.on_rejected is not None:
                        self.on_rejected(ident, exc)
        return out

    def wait(self, timeout: float | None, extra: Sequence[int] = ()) -> None:
        """Block until input may be waiting, the waker fires, an ``extra`` fd is readable, or timeout."""
        select.select([self.fd, self.waker.fd, *extra], [], [], timeout)
        self.waker.clear()

    def recv(self, timeout: float | None) -> tuple[bytes | None, Message]:
        """Block until one verified message arrives; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = deadline_after(timeout)
        while not self._buffered:
            self._buffered.extend(self.drain())
            if self._buffered:
                break
            left = remaining(deadline)
            if left == 0:
                raise TimeoutError(f"no message within {timeout} s")
            self.wait(left)
        return self._buffered.pop(0)

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket (safe twice). ``linger_ms`` > 0 lets queued frames leave first."""
        with self._lock:
            if not self.socket.closed:
                self.socket.close(linger=linger_ms)
        self.waker.close()


def _send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> None:  # type: ignore[type-arg]
    """``send_multipart`` without its per-frame enum arithmetic; small frames are copied (cheaper
    than wrapping them in a ``zmq.Frame``), large ones are sent without a copy."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        small = type(frame) is bytes and len(frame) < _BULK_MIN
        sock.send(frame, _SNDMORE if i < last else 0, copy=small)
