"""The driver's log of refused peers: who knocked with the wrong keys, without flooding the log.

A client that is refused keeps knocking (ZMQ reconnects every 100 ms, an agent says HELLO again), so
every refusal is counted but logged once per peer and reason, then at most once a minute with the
number refused meanwhile. Three doors refuse: the allow-list (the ZAP handler, which knows the
peer's address and key), the CURVE handshake itself (a client holding another pool's server key
cannot even be decrypted; ZMQ reports that on the socket's monitor without the peer's address), and
the HMAC check of every message (a frame signed with another key).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from lightdist.errors import ProtocolError, SignatureError

__all__ = ["HANDSHAKE_EVENTS", "RefusalLog", "handshake_refusal", "signature_refusal"]

log = logging.getLogger("lightdist")
REPEAT_S = 60.0  # the same refusal is logged again at most this often, with a count
_MAX_KEYS = 1024
HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class RefusalLog:
    """Counts refusals and logs the first of each kind at once, repeats at most every ``repeat_s``."""

    def __init__(self, repeat_s: float = REPEAT_S) -> None:
        self.repeat_s = repeat_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last logged, refused since)

    def refused(self, key: str, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            logged_at, since = self._last.get(key, (None, 0))
            if logged_at is not None and now - logged_at < self.repeat_s:
                self._last[key] = (logged_at, since + 1)
                return
            if len(self._last) >= _MAX_KEYS:  # peers choose their keys: keep the memory bounded
                self._last.clear()
            self._last[key] = (now, 0)
        if since:
            line += f" ({since} more refused since the last report)"
        log.warning("%s", line)


def handshake_refusal(event: int, value: int, endpoint: str) -> tuple[str, str] | None:
    """(key, line) for a failed handshake on the driver's socket (from its monitor), else None."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            why = "CURVE decryption failed: the client holds another pool's keys (its client file is not this pool's)"
        elif value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            why = "the client does not use CURVE (no key file, or not a lightdist agent)"
        else:
            why = f"the security handshake failed (ZMTP error {value:#x})"
    elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        why = "the client hung up during the security handshake"
    else:
        return None
    return why, (
        f"refused a connection to {endpoint}: {why}; give that host this pool's client file, or make one "
        "with `lightdist keys add-client DRIVER_FILE NEW_CLIENT_FILE`"
    )


def signature_refusal(refusals: RefusalLog, endpoint: str) -> Callable[[bytes | None, ProtocolError], None]:
    """A channel's ``on_rejected`` for the driver: logs frames signed with another key (a peer that
    got through CURVE, or a channel without it, but holds another pool's HMAC key). Stale and
    replayed frames of our own processes (a rank replaced during recovery) are only counted."""

    def rejected(identity: bytes | None, error: ProtocolError) -> None:
        if isinstance(error, SignatureError):
            refusals.refused(
                "signature",
                f"dropped a message on {endpoint} that is not signed with the pool's key ({error}): its sender "
                "holds another pool's key file, or is not a lightdist process",
            )

    return rejected
