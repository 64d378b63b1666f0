"""Key files and ZMQ CURVE plumbing for a pool whose ranks reach the driver over TCP.

On TCP every connection is encrypted and authenticated with CURVE, and the driver accepts only the
client public keys on its allow-list; the HMAC signing of ``lightdist.protocol`` still applies on top.
Two JSON key files, both mode ``0600``: the *driver* file (HMAC key, CURVE server keypair, allow-list)
and a *client* file for agents and their ranks (the same HMAC key, the server's public key, one
client keypair). Importing this module starts nothing.

Example::

    driver_file, client_file = create_pool_keys("~/.lightdist/pool")
    dk = load_driver_keys(driver_file)
    auth = AllowListAuthenticator(ctx, dk.allowed_clients).start()  # start it before bind
    router = ctx.socket(zmq.ROUTER); secure_server(router, dk); router.bind("tcp://0.0.0.0:5555")
    # on another host
    dealer = ctx.socket(zmq.DEALER); secure_client(dealer, load_client_keys(client_file))
    dealer.connect("tcp://driver:5555")
    ...
    auth.stop()  # before ctx.term()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from lightdist._refusals import HANDSHAKE_EVENTS, RefusalLog, handshake_refusal
from lightdist.errors import ConfigError

__all__ = [
    "AllowListAuthenticator",
    "ClientKeys",
    "DriverKeys",
    "KeyFileError",
    "add_client",
    "create_pool_keys",
    "describe_handshake_failure",
    "load_client_keys",
    "load_driver_keys",
    "secure_client",
    "secure_server",
]

log = logging.getLogger("lightdist")
FORMAT = "lightdist-keys/1"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq asks whatever is bound here
ZAP_DOMAIN = b"lightdist"
_OVERWRITE_HINT = (
    " (`lightdist keys create --force DIR`, or overwrite=True in Python; agents holding the old client file"
    " can then no longer attach)"
)
_ADD_CLIENT = "`lightdist keys add-client DRIVER_FILE NEW_CLIENT_FILE`"


class KeyFileError(ConfigError):
    """A key file is missing, unsafe (permissions, owner), malformed, or of the wrong role."""


@dataclasses.dataclass(frozen=True)
class DriverKeys:
    """The driver's keys. CURVE keys are Z85 text (40 bytes), the form ZMQ socket options take."""

    path: Path
    hmac_key: bytes = dataclasses.field(repr=False)
    public_key: bytes
    secret_key: bytes = dataclasses.field(repr=False)
    allowed_clients: frozenset[bytes]


@dataclasses.dataclass(frozen=True)
class ClientKeys:
    """An agent's or rank's keys: the pool's HMAC key, the server's public key and a client keypair."""

    path: Path
    hmac_key: bytes = dataclasses.field(repr=False)
    server_key: bytes
    public_key: bytes
    secret_key: bytes = dataclasses.field(repr=False)


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError(
            f"libzmq {zmq.zmq_version()} was built without CURVE, which a TCP pool needs: "
            "install a pyzmq build with CURVE (its binary wheels bundle libsodium)"
        )


def _write_private(path: Path, doc: dict[str, Any], overwrite: bool) -> None:
    """Write ``doc`` to ``path`` atomically; the file is 0600 from its first byte, never wider."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # same dir: the rename cannot cross devices
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # created private, not chmod-ed later
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # exactly 0600 whatever the umask
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # unlike rename, link never clobbers: a file created meanwhile still wins
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite it{_OVERWRITE_HINT}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_private(path: Path, role: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # check the file actually opened, not the name (no check/use race)
            if st.st_uid != os.getuid():
                raise KeyFileError(f"{path}: owned by uid {st.st_uid}, not by you (uid {os.getuid()}); refusing it")
            if st.st_mode & 0o077:
                raise KeyFileError(
                    f"{path}: mode {stat.filemode(st.st_mode)} lets others read or change it; run `chmod 600 {path}`"
                )
            raw = f.read()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e.strerror or e}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: not a lightdist key file (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyFileError(f'{path}: not a lightdist key file (expected "format": "{FORMAT}")')
    if doc.get("role") != role:
        raise KeyFileError(
            f"{path}: is a {doc.get('role')!r} key file; the {role} needs the {role!r} file "
            "that `lightdist keys create` or `lightdist keys add-client` made"
        )
    return doc


def _z85_field(path: Path, doc: dict[str, Any], name: str, value: Any = None) -> bytes:
    value = doc.get(name) if value is None else value
    try:
        ok = isinstance(value, str) and len(z85.decode(value)) == 32
    except Exception:  # z85.decode raises ValueError, KeyError or struct.error on junk
        ok = False
    if not ok:
        raise KeyFileError(f"{path}: {name!r} must be a 40-character Z85 CURVE key")  # no value: it may be a secret
    return str(value).encode("ascii")


def _common(path: Path, doc: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    """The HMAC key and the file's own CURVE keypair, checked."""
    _require_curve()
    try:
        hmac_key = bytes.fromhex(doc.get("hmac_key", ""))
    except (TypeError, ValueError):
        hmac_key = b""
    if len(hmac_key) < 32:
        raise KeyFileError(f"{path}: 'hmac_key' must be at least 32 bytes as hex")
    public, secret = _z85_field(path, doc, "curve_public"), _z85_field(path, doc, "curve_secret")
    if zmq.curve_public(secret) != public:  # a mismatched pair would only show as a silent handshake failure
        raise KeyFileError(f"{path}: 'curve_public' is not the public key of 'curve_secret'")
    return hmac_key, public, secret


def load_driver_keys(path: str | os.PathLike[str]) -> DriverKeys:
    """Read the driver's key file (refused unless 0600 and yours, as ssh does)."""
    p = Path(path).expanduser()
    doc = _read_private(p, "driver")
    hmac_key, public, secret = _common(p, doc)
    allowed = doc.get("allowed_clients")
    if not isinstance(allowed, list):
        raise KeyFileError(f"{p}: 'allowed_clients' must be a list of Z85 client public keys")
    return DriverKeys(p, hmac_key, public, secret, frozenset(_z85_field(p, doc, "allowed_clients", k) for k in allowed))


def load_client_keys(path: str | os.PathLike[str]) -> ClientKeys:
    """Read an agent's or rank's key file (refused unless 0600 and yours)."""
    p = Path(path).expanduser()
    doc = _read_private(p, "client")
    hmac_key, public, secret = _common(p, doc)
    return ClientKeys(p, hmac_key, _z85_field(p, doc, "server_public"), public, secret)


def _client_doc(hmac_key: bytes, server_public: bytes) -> dict[str, Any]:
    public, secret = zmq.curve_keypair()
    return {
        "format": FORMAT,
        "role": "client",
        "hmac_key": hmac_key.hex(),
        "server_public": server_public.decode(),
        "curve_public": public.decode(),
        "curve_secret": secret.decode(),
    }


def create_pool_keys(
    directory: str | os.PathLike[str],
    *,
    driver_name: str = "driver.json",
    client_name: str = "client.json",
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create a pool's driver and client key files in ``directory`` (made 0700 if missing).

    The client's public key is the first entry of the driver's allow-list; copy the client file to
    each agent host. Returns ``(driver_file, client_file)``.
    """
    _require_curve()
    d = Path(directory).expanduser()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    driver_file, client_file = d / driver_name, d / client_name
    for p in (driver_file, client_file):  # check both first: never leave half a pool behind
        if not overwrite and p.exists():
            raise KeyFileError(f"{p}: already exists; refusing to overwrite it{_OVERWRITE_HINT}")
    hmac_key, (public, secret) = os.urandom(32), zmq.curve_keypair()
    client = _client_doc(hmac_key, public)
    _write_private(
        driver_file,
        {
            "format": FORMAT,
            "role": "driver",
            "hmac_key": hmac_key.hex(),
            "curve_public": public.decode(),
            "curve_secret": secret.decode(),
            "allowed_clients": [client["curve_public"]],
        },
        overwrite,
    )
    _write_private(client_file, client, overwrite)
    return driver_file, client_file


def add_client(driver_file: str | os.PathLike[str], client_file: str | os.PathLike[str]) -> Path:
    """Create a client file with a new keypair and add its public key to the driver file's allow-list.

    A running driver picks it up after ``auth.allowed = load_driver_keys(driver_file).allowed_clients``.
    Not safe against a concurrent ``add_client`` on the same driver file.
    """
    dk = load_driver_keys(driver_file)
    out = Path(client_file).expanduser()
    client = _client_doc(dk.hmac_key, dk.public_key)
    _write_private(out, client, overwrite=False)
    doc = _read_private(dk.path, "driver")  # keep any fields this version does not know
    doc["allowed_clients"] = [*doc["allowed_clients"], client["curve_public"]]
    try:
        _write_private(dk.path, doc, overwrite=True)
    except BaseException:
        out.unlink(missing_ok=True)  # a client file whose key is not allowed would only fail at connect
        raise
    return out


def _require_unused(socket: zmq.Socket[Any], verb: str) -> None:
    if socket.getsockopt(zmq.LAST_ENDPOINT):  # CURVE options only take effect for later binds/connects
        raise RuntimeError(f"set the CURVE keys before the socket's first {verb}")


def secure_server(socket: zmq.Socket[Any], keys: DriverKeys) -> None:
    """Make ``socket`` (before ``bind``) a CURVE server that asks the ZAP handler about every client."""
    _require_curve()
    _require_unused(socket, "bind")
    # ZAP_ENFORCE_DOMAIN fails closed: by default libzmq 4.3 admits *any* CURVE client when no ZAP
    # handler is bound to the context (the "Stonehouse" pattern); with it such clients are refused.
    for option, value in (
        (zmq.CURVE_SERVER, 1),
        (zmq.CURVE_SECRETKEY, keys.secret_key),
        (zmq.CURVE_PUBLICKEY, keys.public_key),
        (zmq.ZAP_DOMAIN, ZAP_DOMAIN),
        (zmq.ZAP_ENFORCE_DOMAIN, 1),
    ):
        socket.setsockopt(option, value)


def secure_client(socket: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Make ``socket`` (before ``connect``) a CURVE client of the pool's driver."""
    _require_curve()
    _require_unused(socket, "connect")
    socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public_key)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key)


_HANDSHAKE_TEXT: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "one side uses CURVE and the other does not",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE decryption failed: the client holds another pool's server key",
}


def describe_handshake_failure(event: int, value: int) -> str | None:
    """A socket-monitor handshake failure in words (``None`` for other events).

    A refused DEALER raises nothing: its sends just queue. Monitor it to tell the user why.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the driver refused this client's CURVE key (ZAP status {value}): use the pool's client file, "
            f"or make a new one on the driver's host with {_ADD_CLIENT}"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return _HANDSHAKE_TEXT.get(value, f"security handshake failed (ZMTP error {value:#x})")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # value is an errno; the peer just hung up
        return f"security handshake failed ({os.strerror(value)}): a wrong server key, or no authenticator?"
    return None


class AllowListAuthenticator:
    """A ZAP handler for one ``zmq.Context``: admits CURVE clients whose public key is allowed.

    Replace ``allowed`` at any time (e.g. after :func:`add_client`); it applies to new connections.
    ``denied`` and ``accepted`` count decisions. ``start()`` before binding a server socket;
    :meth:`watch` the bound socket to log handshakes that fail before the allow-list is asked;
    ``stop()`` (idempotent) before ``context.term()``. Refusals are logged through
    :class:`~lightdist._refusals.RefusalLog` (once per peer, then at most once a minute).
    """

    def __init__(self, context: zmq.Context[Any], allowed: Iterable[bytes]) -> None:
        self.context = context
        # Replaced whole (``auth.allowed = frozenset(...)``), never mutated: the thread reads it unlocked.
        self.allowed: frozenset[bytes] = frozenset(allowed)
        self.denied = 0
        self.accepted = 0
        self.refusals = RefusalLog()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: queue.SimpleQueue[tuple[zmq.Socket[Any], str]] = queue.SimpleQueue()  # handed to the thread

    def start(self) -> AllowListAuthenticator:
        _require_curve()
        if self._thread is not None or self._stopping.is_set():
            raise RuntimeError("an AllowListAuthenticator starts once; make a new one")
        sock = self.context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)  # bound here, not in the thread, so that a failure raises to the caller
        except zmq.ZMQError as e:
            sock.close()
            if e.errno == zmq.EADDRINUSE:
                raise RuntimeError(
                    "this zmq.Context already has a ZAP handler; use one authenticator per context"
                ) from e
            raise
        # the socket moves to the thread; Thread.start is the memory barrier libzmq asks for
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="lightdist-zap", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("lightdist-zap did not stop within %.1f s", timeout)

    def watch(self, server: zmq.Socket[Any], endpoint: str) -> None:
        """Log the failed handshakes of ``server`` (bound at ``endpoint``): a client with another
        pool's keys fails CURVE decryption and never reaches the allow-list. Call from the thread
        that owns ``server``, after :meth:`start`."""
        monitor = server.get_monitor_socket(HANDSHAKE_EVENTS)
        self._watch.put((monitor, endpoint))  # the queue's lock is the barrier libzmq asks for

    def _serve(self, sock: zmq.Socket[Any]) -> None:
        from zmq.utils.monitor import recv_monitor_message

        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        monitors: dict[zmq.Socket[Any], str] = {}
        try:
            while not self._stopping.is_set():
                while not self._watch.empty():
                    monitor, endpoint = self._watch.get()
                    monitors[monitor] = endpoint
                    poller.register(monitor, zmq.POLLIN)
                for ready, _ in poller.poll(50):  # a short poll, so stop() needs no wake-up socket
                    if ready is sock:
                        self._answer(sock, sock.recv_multipart())
                        continue
                    event = recv_monitor_message(ready)
                    refusal = handshake_refusal(int(event["event"]), int(event["value"]), monitors[ready])
                    if refusal is not None:
                        self.denied += 1
                        self.refusals.refused(*refusal)
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)
            for monitor in monitors:
                monitor.close(linger=0)

    def _answer(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        # RFC 27 request: version, request id, domain, address, identity, mechanism, credentials...
        request_id = frames[1] if len(frames) > 1 else b""
        address = frames[3].decode("utf-8", "replace") if len(frames) > 3 else "?"
        mechanism = frames[5] if len(frames) > 5 else b"?"
        key = z85.encode(frames[6]) if mechanism == b"CURVE" and len(frames) == 7 and len(frames[6]) == 32 else None
        if frames[:1] == [b"1.0"] and key is not None and key in self.allowed:
            self.accepted += 1
            sock.send_multipart([b"1.0", request_id, b"200", b"OK", key, b""])  # User-Id: the client key
            return
        self.denied += 1
        client = key.decode() if key else "(none)"
        self.refusals.refused(
            f"{address} {client}",
            f"refused a {mechanism.decode('ascii', 'replace')} connection from {address}: client key {client} is "
            f"not on the pool's allow-list (another pool's client file? make one for this pool with {_ADD_CLIENT})",
        )
        sock.send_multipart([b"1.0", request_id, b"400", b"client key not allowed", b"", b""])
