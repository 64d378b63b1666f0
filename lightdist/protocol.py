"""The wire format: message kinds, signing, replay protection, (de)serialisation, SSE encoding.

Pure functions of bytes and keys: this module owns no socket and imports neither zmq nor torch, so it
tests in milliseconds. The format is specified in ``docs/protocol.md``; keep the two in step.

A message is a list of frames::

    [signature, header, payload_0, payload_1, ...]

``header`` is a fixed binary struct (version, kind, call id, rank, sequence number) followed by the
sender's name.
``signature`` is HMAC-SHA256 with the pool's key over a domain tag and every later frame, each
prefixed by its length (so bytes cannot be shifted between frames). A receiver checks the signature
with :func:`hmac.compare_digest` and the sequence number *before* it parses anything else; payload
frames are only unpickled by the code that asked for them, after that.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import io
import json
import marshal
import math
import os
import struct
import sys
import types
from collections import ChainMap
from collections.abc import Sequence
from typing import Any

import cloudpickle

from lightdist.errors import ProtocolError, SignatureError, TextEventError

__all__ = [
    "DRIVER_RANK",
    "Header",
    "Kind",
    "Message",
    "Session",
    "pack_header",
    "parse_header",
    "dumps",
    "encode_text_event",
    "loads",
    "new_key",
    "to_jsonable",
]

VERSION = 2
VERSION_TAG = b"lightdist-v2"
DRIVER_RANK = -1
_SIG_LEN = hashlib.sha256().digest_size
_LEN = struct.Struct("!Q")
# version, kind, call id, rank, sequence number, bulk frames; the sender name (UTF-8) follows.
_HEADER = struct.Struct("!BBQiQH")
_DIGEST = hashlib.sha256().digest_size


class Kind(enum.IntEnum):
    """Message kinds. Driver → worker: CALL, CANCEL, PING, EXIT, REBUILD, CREDIT. Worker → driver:
    READY to REBUILT, and TAKEN. HELLO to FENCED, OUTPUT and REFUSED are between the driver and the agent of a host
    (a multi-host pool); the header's call field carries the agent's generation there."""

    READY = 1  # setup finished on this rank; payload: what this rank can reach out of band (pickled)
    FAILED = 2  # setup raised on this rank; payload: error report
    CALL = 3  # run __call__; payload: envelope (flags, sys.path, cwd, tensor manifest), kwargs, tensor frames
    STREAM_ITEM = 4  # one add_streaming_result item of the call
    RESULT = 5  # __call__ returned; payload: reply meta, the value (rank 0 only), tensor frames
    ERROR = 6  # __call__ raised; payload: error report
    CANCEL = 7  # set worker.cancelled for the call
    PING = 8
    PONG = 9
    EXIT = 10  # driver: run teardown and exit; worker: reply once teardown has run
    REBUILD = 11  # driver: re-join the process group under a new store prefix; payload: the prefix
    REBUILT = 12  # worker: the group is rebuilt (FAILED with a report if that raised)
    HELLO = 13  # agent: attach me; payload: JSON host facts
    ASSIGN = 14  # driver: your generation, lease and the settings of your ranks; payload: JSON
    SPAWN = 15  # driver: fork this rank; payload: the rank's bootstrap (pickled)
    HOST_EVENT = 16  # agent: a rank spawned or exited, the template failed; payload: JSON
    KILL = 17  # driver: signal these ranks; payload: JSON {"ranks": [...], "signal": n}
    FENCED = 18  # driver: your generation is over (you were declared lost); kill your ranks and exit
    TAKEN = 19  # worker: this call's out-of-band storages are mapped or copied (the driver may free them)
    CREDIT = 20  # driver → rank 0: the caller consumed this many stream items and bytes; payload: 16 bytes
    # (driver → agent: the driver wrote this many of its ranks' OUTPUT messages and bytes)
    OUTPUT = 21  # agent → driver: its ranks' output, prefixed "[host rank N] "; payload: stream name, UTF-8 text
    REFUSED = 22  # driver → agent: not attached (its host name is taken by a live agent); payload: why, UTF-8


_KINDS = {int(k): k for k in Kind}


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    call: int
    rank: int
    seq: int
    sender: str
    bulk: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    header: Header
    payload: tuple[bytes, ...]
    bulk: tuple[Any, ...] = ()  # large frames outside the MAC; check with verify_bulk before use

    @property
    def kind(self) -> Kind:
        return self.header.kind


def new_key() -> bytes:
    """A fresh random 256-bit signing key (one per pool)."""
    return os.urandom(32)


def pack_header(kind: Kind, call: int, rank: int, seq: int, sender: str, bulk: int = 0) -> bytes:
    return _HEADER.pack(VERSION, kind, call, rank, seq, bulk) + sender.encode()


def parse_header(raw: bytes) -> Header:
    if len(raw) < _HEADER.size:
        raise ProtocolError(f"header of {len(raw)} bytes is too short")
    version, kind, call, rank, seq, bulk = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, expected {VERSION}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind}")
    try:
        sender = raw[_HEADER.size :].decode()
    except UnicodeDecodeError:
        raise ProtocolError("sender name is not UTF-8") from None
    return Header(_KINDS[kind], call, rank, seq, sender, bulk)


def bulk_digests(bulk: Sequence[Any]) -> bytes:
    """The payload frame that signs ``bulk`` frames: their SHA-256 digests, concatenated.

    Hashing releases the GIL and needs no lock, so the sender computes it before the (cheap,
    locked) signing, and a big tensor never holds up the threads that keep heartbeats going."""
    return b"".join(hashlib.sha256(frame).digest() for frame in bulk)


def verify_bulk(digests: bytes, bulk: Sequence[Any]) -> None:
    """Check each bulk frame against the signed digests; :class:`ProtocolError` on any mismatch.
    Receivers call it before they use a bulk frame (off the I/O thread)."""
    if len(digests) != _DIGEST * len(bulk):
        raise ProtocolError(f"{len(bulk)} bulk frames but {len(digests)} bytes of digests")
    for i, frame in enumerate(bulk):
        if not hmac.compare_digest(hashlib.sha256(frame).digest(), digests[i * _DIGEST : (i + 1) * _DIGEST]):
            raise ProtocolError(f"bulk frame {i} does not match its signed digest (altered in transit?)")


class Session:
    """Signs outgoing messages and verifies incoming ones for one endpoint.

    Each endpoint signs with its own ``sender`` name and a sequence number that only grows. Incoming
    messages are accepted only from senders in :attr:`peers` (the caller keeps it current: a respawned
    rank gets a new sender name, so frames of its previous life are stale), with a valid signature and
    a sequence number above the last one accepted from that sender (replays are rejected).

    Not thread-safe: the transport serialises :meth:`pack` (so sequence order is send order) and
    calls :meth:`unpack` from one thread.
    """

    def __init__(self, key: bytes, sender: str, rank: int, first_seq: int = 0) -> None:
        if len(key) < 16:
            raise ValueError("the signing key must be at least 16 bytes")
        # Keyed once; each message copies this state instead of re-deriving the HMAC pads.
        self._mac = hmac.new(key, VERSION_TAG, "sha256")
        self.sender = sender
        self.rank = rank
        self._seq = first_seq
        self._last_seen: dict[str, int] = {}
        self.peers: set[str] | None = None  # None: any sender that signs with the key
        # Senders not (yet) in ``peers`` whose signed messages are still accepted: a host's agent
        # introduces itself with HELLO under a name the driver cannot know in advance.
        self.newcomer_prefix: str | None = None

    @property
    def seq(self) -> int:
        """The sequence number of the last message packed."""
        return self._seq

    def sign(self, frames: Sequence[bytes]) -> bytes:
        mac = self._mac.copy()
        for frame in frames:
            mac.update(_LEN.pack(len(frame)))
            mac.update(frame)
        return mac.digest()

    def pack(self, kind: Kind, call: int = 0, payload: Sequence[bytes] = (), bulk: Sequence[Any] = ()) -> list[Any]:
        """Build the signed frames of one message.

        ``bulk``: large frames sent after the payload and left out of the MAC; the payload's last
        frame must then be :func:`bulk_digests` of them (signed like every payload frame)."""
        self._seq += 1
        body = [pack_header(kind, call, self.rank, self._seq, self.sender, len(bulk)), *payload]
        return [self.sign(body), *body, *bulk]

    def accept_from(self, sender: str, after_seq: int = 0) -> None:
        """Allow ``sender``; its next message must carry a sequence number above ``after_seq``."""
        if self.peers is None:
            self.peers = set()
        self.peers.add(sender)
        self._last_seen[sender] = max(self._last_seen.get(sender, 0), after_seq)

    def forget(self, sender: str) -> None:
        """Stop accepting ``sender`` (its process is gone); its sequence floor is kept."""
        if self.peers is not None:
            self.peers.discard(sender)

    def unpack(self, frames: Sequence[Any]) -> Message:
        """Verify and parse ``frames``; raise :class:`ProtocolError` on any doubt.

        Order matters: the signature is checked over the raw bytes before the header is parsed,
        and nothing here unpickles.
        """
        if len(frames) < 2:
            raise SignatureError(f"expected at least 2 frames, got {len(frames)}")
        raw_header = bytes(frames[1])
        # Which frames the MAC covers depends on the header's bulk count, read before the check: a
        # forged count changes the header, which the MAC covers, so the check fails all the same.
        nbulk = _HEADER.unpack_from(raw_header)[5] if len(raw_header) >= _HEADER.size else 0
        if nbulk > len(frames) - 3:
            nbulk = 0  # impossible as signed: the whole message is checked, and fails, as it stands
        end = len(frames) - nbulk
        signature, body = bytes(frames[0]), [raw_header, *(bytes(f) for f in frames[2:end])]
        if len(signature) != _SIG_LEN or not hmac.compare_digest(signature, self.sign(body)):
            raise SignatureError("bad signature")
        header = parse_header(body[0])  # signed but malformed: a bug, not an attack
        if self.peers is not None and header.sender not in self.peers:
            newcomer = self.newcomer_prefix is not None and header.sender.startswith(self.newcomer_prefix)
            if not newcomer:
                raise ProtocolError(f"stale or unknown sender {header.sender!r}")
        last = self._last_seen.get(header.sender, 0)
        if header.seq <= last:
            raise ProtocolError(f"replayed frame from {header.sender!r}: seq {header.seq} <= {last}")
        self._last_seen[header.sender] = header.seq
        return Message(header, tuple(body[1:]), tuple(frames[end:]))


def _code_reduce(code: types.CodeType) -> tuple[Any, tuple[bytes]]:
    return marshal.loads, (marshal.dumps(code),)


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's Pickler, except that code sent by value keeps its file name (marshal keeps it;
    cloudpickle writes "<dynamic-code>"): a warning or traceback raised on a rank by a function of
    the driver's script names that script and line, with the source line, as in-process. Both
    sides run the same Python (the pool starts ranks with the driver's interpreter)."""

    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """Serialise by value where needed (classes from ``__main__``, notebooks and closures)."""
    with io.BytesIO() as buf:
        Pickler(buf, protocol=5).dump(obj)
        return buf.getvalue()


def loads(data: bytes) -> Any:
    """Only ever called on payload frames of a message that :meth:`Session.unpack` accepted."""
    return cloudpickle.loads(data)


# --- server-sent events ---------------------------------------------------------------------------

_JSON_SCALARS = (str, int, bool, type(None))


def to_jsonable(value: Any, image_format: str = "jpeg", _path: str = "item") -> Any:
    """Turn ``value`` into plain JSON data, encoding media the way ``fal.distributed`` does.

    PIL images, torch tensors and numpy arrays become media objects (see :func:`_media_object`),
    numpy scalars numbers, dataclasses dicts; non-finite floats become ``null`` (JSON has no NaN).
    Anything else raises :class:`TextEventError` naming where in ``value`` it sits.
    """
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {str(k): to_jsonable(v, image_format, f"{_path}[{k!r}]") for k, v in value.items()}
        if len(out) != len(value):
            raise TextEventError(f"{_path} has keys that are equal as JSON strings: {sorted(map(str, value))}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, image_format, f"{_path}[{i}]") for i, v in enumerate(value)]
    media = _media_object(value, image_format, _path)
    if media is not None:
        return media
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return to_jsonable(value.item(), image_format, _path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), image_format, _path)
    raise TextEventError(
        f"{_path} is a {type(value).__module__}.{type(value).__qualname__}, which has no JSON form; "
        "stream dicts, lists, strings, numbers, tensors, numpy arrays or PIL images, "
        "or call stream(..., as_text_events=False) to receive Python objects"
    )


def _media_object(value: Any, image_format: str, path: str) -> dict[str, Any] | None:
    """A PIL image, tensor or numpy array as ``fal.distributed`` sends it in a text event, else None.

    The fields are fal's, so front ends written for it read ours: ``content_type``, ``url`` (a
    ``data:`` URL of the encoded bytes), ``data`` (always ``null`` in JSON), and ``width``/``height``
    for images or ``shape``/``dtype`` for tensors and arrays. A tensor's bytes are ``torch.save``'s,
    an array's ``numpy.save``'s. The classes are looked up in ``sys.modules``: a value of one means
    its library is loaded, and this module must not import torch itself.
    """
    torch, numpy, pil = sys.modules.get("torch"), sys.modules.get("numpy"), sys.modules.get("PIL.Image")
    if pil is not None and isinstance(value, pil.Image):
        fmt, encoded = _encode_image(value, image_format)
        width, height = value.size
        return _media(f"image/{fmt}", encoded, width=width, height=height)
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().clone()  # clone: a view would save its whole base storage
        buf = io.BytesIO()
        torch.save(tensor, buf)
        return _media("application/tensor", buf.getvalue(), shape=list(tensor.shape), dtype=str(tensor.dtype))
    if numpy is not None and isinstance(value, numpy.ndarray):
        buf = io.BytesIO()
        try:
            numpy.save(buf, value, allow_pickle=False)
        except ValueError:
            raise TextEventError(f"{path} is a numpy array of dtype {value.dtype}, which has no JSON form") from None
        return _media("application/ndarray", buf.getvalue(), shape=list(value.shape), dtype=str(value.dtype))
    return None


def _media(content_type: str, encoded: bytes, **fields: Any) -> dict[str, Any]:
    url = f"data:{content_type};base64,{base64.b64encode(encoded).decode()}"
    return {"content_type": content_type, **fields, "data": None, "url": url}


def _encode_image(image: Any, image_format: str) -> tuple[str, bytes]:
    fmt = image_format.lower()
    if fmt not in ("jpeg", "jpg", "png"):
        raise TextEventError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha channel
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper())
    return fmt, buf.getvalue()


def encode_text_event(value: Any, image_format: str = "jpeg") -> bytes:
    """One server-sent event: ``b"data: <json>\\n\\n"``."""
    try:
        plain = to_jsonable(value, image_format)
    except RecursionError:
        raise TextEventError("the item contains itself or is nested too deeply for JSON") from None
    data = json.dumps(plain, separators=(",", ":"), allow_nan=False)
    return b"data: " + data.encode() + b"\n\n"
