"""Rank output from other hosts, shown by the driver: ``[hostB rank 2] ...`` next to its own.

On one host the template writes its ranks' prefixed output to pipes the driver reads (see
:mod:`lightdist._template`). An agent's template does the same into the agent, which forwards it to
the driver as OUTPUT messages; the driver writes them to its ``sys.stdout``/``sys.stderr`` from a
thread of its own and returns CREDIT once written. The agent keeps at most a window (1 MiB) of
output unwritten by the driver: past it, its output thread waits, so the template stops reading the
ranks' pipes, and after 1 s without progress drops and counts their output (one notice line marks
the gap), exactly as for a driver on the same host that stops reading its stdout. So memory stays
bounded on both sides, and nothing here ever holds up the heartbeat, spawns or kills: the agent's
loop and the driver's I/O thread only hand bytes over.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable

from lightdist._link import StreamWindow
from lightdist._procs import write_text

__all__ = ["OUTPUT_WINDOW_BYTES", "OutputForwarder", "OutputRelay", "say"]

log = logging.getLogger("lightdist")

OUTPUT_WINDOW_BYTES = 1 << 20  # output an agent may have in flight, not yet written by the driver
_OUTPUT_WINDOW_ITEMS = 4096  # messages in flight (the template sends at most 64 KiB per read)
_RELAY_JOIN_S = 1.0  # how long closing waits for the driver's writes to finish
_STUCK_S = 0.5  # a write blocked this long is on a stdout nobody reads: closing does not wait for it


def say(line: str) -> None:
    """A line the driver's operator must see (what a start waits for): logged at INFO when the
    application set logging up to show it, else printed to stderr, where logging's defaults (warnings
    only) would have dropped it."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(line)
    else:
        print(f"lightdist: {line}", file=sys.stderr, flush=True)


class OutputForwarder:
    """The agent's side: ``forward`` is the template's output sink (its output thread calls it)."""

    def __init__(self, send: Callable[[str, str], None], window_bytes: int = OUTPUT_WINDOW_BYTES) -> None:
        self._send = send
        self._window = StreamWindow(_OUTPUT_WINDOW_ITEMS, window_bytes)
        self._closing = threading.Event()
        self.dropped = 0  # bytes not sent because the agent was stopping

    def forward(self, stream: str, text: str) -> None:
        """Send when the window has room; waits (the template holds, then drops, the rest) until then."""
        nbytes = len(text.encode("utf-8", "replace"))
        if not self._window.reserve(nbytes, self._closing):
            self.dropped += nbytes
            return
        self._send(stream, text)

    def credit(self, items: int, nbytes: int) -> None:
        """CREDIT from the driver: it wrote this much."""
        self._window.credit(items, nbytes)

    def close(self) -> None:
        self._closing.set()
        self._window.wake()


class OutputRelay:
    """The driver's side for one host: writes its ranks' output from a thread of its own (the I/O
    thread must never block on a ``sys.stdout`` nobody reads) and credits what it wrote."""

    def __init__(self, name: str, credit: Callable[[int, int], None]) -> None:
        self.name = name
        self._credit = credit
        self._queue: queue.SimpleQueue[tuple[str, str, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._writing_since: float | None = None

    def put(self, stream: str, text: str, nbytes: int) -> None:
        """From the I/O thread: never blocks (the agent's window bounds what can be queued)."""
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._write, name="lightdist-host-output", daemon=True)
                self._thread.start()
        self._queue.put((stream, text, nbytes))

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            items, nbytes = 0, 0
            while item is not None:  # everything waiting now, then one CREDIT for all of it
                stream, text, size = item
                self._writing_since = time.monotonic()
                write_text(getattr(sys, stream), text)
                self._writing_since = None
                items, nbytes = items + 1, nbytes + size
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._credit(items, nbytes)
            if item is None:
                return

    def close(self, wait: bool = True) -> None:
        """Stop once what is queued is written (the host left, or the pool stops); ``wait``: for at
        most a second, and not at all for a write that is stuck (a driver's stdout nobody reads:
        the thread is a daemon), so that stopping a pool of many hosts stays quick."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._queue.put(None)
        since = self._writing_since
        stuck = since is not None and time.monotonic() - since > _STUCK_S
        if wait and not stuck and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_RELAY_JOIN_S)
