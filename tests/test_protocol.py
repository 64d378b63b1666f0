"""Pure tests of the wire format (``lightdist.protocol``) and of ``transport.Channel`` on ``inproc://``.

No processes, no ports: every test here runs in milliseconds.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from lightdist import protocol
from lightdist.errors import ProtocolError, TextEventError
from lightdist.protocol import DRIVER_RANK, Kind, Session
from lightdist.transport import Channel
from tests.conftest import wait_until

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
PAYLOAD = (b"first", b"", b"\x00" * 100, b"last frame")
WAIT_S = 5.0


def _pair(sender: str = "r0.1", rank: int = 0) -> tuple[Session, Session]:
    """A sending session and a receiving one (the driver) that share the key."""
    return Session(KEY, sender=sender, rank=rank), Session(KEY, sender="driver", rank=DRIVER_RANK)


def _signed(body: list[bytes], key: bytes = KEY) -> list[bytes]:
    """``body`` with a valid signature in front (to reach the checks behind the signature)."""
    return [Session(key, "any", 0).sign(body), *body]


class _Marker:
    """Unpickling this creates ``path``: it proves whether anything got unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


# --- pack / unpack ---------------------------------------------------------------------------------


def test_round_trip_keeps_header_and_every_payload_frame() -> None:
    """What ``pack`` signs, ``unpack`` accepts and returns unchanged, frame by frame."""
    tx, rx = _pair()
    frames = tx.pack(Kind.RESULT, call=7, payload=PAYLOAD)
    msg = rx.unpack(frames)
    assert msg.header == protocol.Header(Kind.RESULT, 7, 0, 1, "r0.1")
    assert msg.kind is Kind.RESULT
    assert msg.payload == PAYLOAD
    assert len(frames) == 2 + len(PAYLOAD) and len(frames[0]) == 32


def test_sequence_numbers_grow_from_first_seq() -> None:
    """Each packed message carries the next sequence number; gaps are accepted, order is not."""
    tx = Session(KEY, "r1.1", 1, first_seq=10)
    rx = Session(KEY, "driver", DRIVER_RANK)
    first, _skipped, third = (tx.pack(Kind.PONG) for _ in range(3))
    assert tx.seq == 13
    assert rx.unpack(first).header.seq == 11
    assert rx.unpack(third).header.seq == 13


def test_unpack_accepts_bytearray_and_memoryview_frames() -> None:
    """Frames may arrive as any bytes-like object (zmq frames, buffers)."""
    tx, rx = _pair()
    frames = tx.pack(Kind.CALL, 1, PAYLOAD)
    mixed = [bytearray(f) if i % 2 else memoryview(f) for i, f in enumerate(frames)]
    assert rx.unpack(mixed).payload == PAYLOAD


def test_unpack_never_unpickles(tmp_path: Path) -> None:
    """Even a correctly signed pickle payload stays bytes until the caller calls ``loads``."""
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Marker(marker))
    tx, rx = _pair()
    assert rx.unpack(tx.pack(Kind.RESULT, 1, [evil])).payload == (evil,)
    assert not marker.exists()
    protocol.loads(evil)  # the payload really is armed: loading it creates the file
    assert marker.exists()


# --- tampering -------------------------------------------------------------------------------------


def _flip(frame: bytes, index: int = 0) -> bytes:
    data = bytearray(frame)
    data[index] ^= 0x01
    return bytes(data)


def _tampered() -> dict[str, list[bytes]]:
    """Ways to alter a valid ``[sig, header, p0, p1, p2, p3]`` message."""
    sig, header, *payload = Session(KEY, "r0.1", 0).pack(Kind.RESULT, 3, PAYLOAD)
    out = {
        "signature bit": [_flip(sig, 5), header, *payload],
        "signature truncated": [sig[:31], header, *payload],
        "signature extended": [sig + b"\x00", header, *payload],
        "header call id": [sig, _flip(header, 5), *payload],
        "header sender": [sig, header[:-1] + b"2", *payload],
        "frame dropped at end": [sig, header, *payload[:-1]],
        "header dropped": [sig, *payload],
        "frame added": [sig, header, *payload, b"extra"],
        "empty frame added": [sig, header, *payload, b""],
        "frames swapped": [sig, header, payload[3], payload[1], payload[2], payload[0]],
        # The concatenation of the frames is unchanged: only the length prefixes catch these.
        "byte moved to next frame": [sig, header, payload[0][:-1], payload[0][-1:] + payload[1], *payload[2:]],
        "byte moved to previous frame": [sig, header, *payload[:2], payload[2] + payload[3][:1], payload[3][1:]],
        "header byte moved to payload": [sig, header[:-1], header[-1:] + payload[0], *payload[1:]],
        "frames merged": [sig, header, payload[0] + payload[1], *payload[2:]],
    }
    for i, frame in enumerate(payload):
        changed = list(payload)
        changed[i] = _flip(frame) if frame else b"\x00"
        out[f"payload frame {i}"] = [sig, header, *changed]
    return out


@pytest.mark.parametrize("case", sorted(_tampered()))
def test_any_change_to_the_frames_breaks_the_signature(case: str) -> None:
    """Every altered message is refused as a bad signature, and refusing it costs no state."""
    tx, rx = _pair()
    original = tx.pack(Kind.RESULT, 3, PAYLOAD)
    with pytest.raises(ProtocolError, match="bad signature"):
        rx.unpack(_tampered()[case])
    assert rx.unpack(original).payload == PAYLOAD  # the untouched message is still accepted


def test_wrong_key_is_a_bad_signature() -> None:
    """A message signed with another key is refused."""
    frames = Session(OTHER_KEY, "r0.1", 0).pack(Kind.READY)
    with pytest.raises(ProtocolError, match="bad signature"):
        Session(KEY, "driver", DRIVER_RANK).unpack(frames)


def test_key_shorter_than_16_bytes_is_refused() -> None:
    """Short keys raise ``ValueError``; 16 bytes is enough."""
    with pytest.raises(ValueError, match="16 bytes"):
        Session(b"x" * 15, "driver", DRIVER_RANK)
    Session(b"x" * 16, "driver", DRIVER_RANK)


def test_new_key_is_32_random_bytes() -> None:
    """Each pool gets its own 256-bit key."""
    a, b = protocol.new_key(), protocol.new_key()
    assert len(a) == len(b) == 32 and a != b


@pytest.mark.parametrize("frames", [[], [b"\x00" * 32]], ids=["no frames", "signature only"])
def test_short_frame_lists_are_refused(frames: list[bytes]) -> None:
    """Fewer than two frames (signature + header) is an error, not an IndexError."""
    with pytest.raises(ProtocolError, match="at least 2 frames"):
        Session(KEY, "driver", DRIVER_RANK).unpack(frames)


# --- replay and senders ----------------------------------------------------------------------------


def test_replayed_message_is_refused() -> None:
    """The same frames accepted once are refused the second time."""
    tx, rx = _pair()
    frames = tx.pack(Kind.RESULT, 1, [b"v"])
    rx.unpack(frames)
    with pytest.raises(ProtocolError, match="replayed"):
        rx.unpack(frames)


def test_lower_sequence_number_is_refused() -> None:
    """A message older than one already accepted from the same sender is refused."""
    tx, rx = _pair()
    older, newer = tx.pack(Kind.PONG), tx.pack(Kind.PONG)
    rx.unpack(newer)
    with pytest.raises(ProtocolError, match="seq 1 <= 2"):
        rx.unpack(older)


def test_sequence_floors_are_per_sender() -> None:
    """Another sender's high sequence number does not block a sender that is behind."""
    rx = Session(KEY, "driver", DRIVER_RANK)
    rx.unpack(Session(KEY, "r0.1", 0, first_seq=100).pack(Kind.READY))
    assert rx.unpack(Session(KEY, "r1.1", 1).pack(Kind.READY)).header.seq == 1


def test_sequence_zero_is_never_accepted() -> None:
    """Sequence numbers start at 1: a signed seq-0 header is refused as a replay."""
    rx = Session(KEY, "driver", DRIVER_RANK)
    with pytest.raises(ProtocolError, match="replayed"):
        rx.unpack(_signed([protocol.pack_header(Kind.READY, 0, 0, 0, "r0.1")]))


def test_any_sender_is_accepted_while_peers_is_unset() -> None:
    """Without an allow-list, every sender that signs with the key is accepted."""
    tx, rx = _pair("stranger")
    assert rx.peers is None
    assert rx.unpack(tx.pack(Kind.PING)).header.sender == "stranger"


def test_unknown_sender_is_refused_once_peers_is_set() -> None:
    """``accept_from`` turns on the allow-list: other senders are refused even with the key."""
    rx = Session(KEY, "driver", DRIVER_RANK)
    rx.accept_from("r0.1")
    assert rx.peers == {"r0.1"}
    rx.unpack(Session(KEY, "r0.1", 0).pack(Kind.READY))
    with pytest.raises(ProtocolError, match="unknown sender 'r0.2'"):
        rx.unpack(Session(KEY, "r0.2", 0).pack(Kind.READY))


def test_forgotten_sender_is_stale_and_keeps_its_floor() -> None:
    """After ``forget`` a sender is refused; accepting it again does not reopen old sequence numbers."""
    tx, rx = _pair()
    rx.accept_from("r0.1")
    old = tx.pack(Kind.RESULT, 1)
    rx.unpack(old)
    rx.forget("r0.1")
    with pytest.raises(ProtocolError, match="stale or unknown sender"):
        rx.unpack(tx.pack(Kind.RESULT, 2))
    rx.accept_from("r0.1")
    with pytest.raises(ProtocolError, match="replayed"):
        rx.unpack(old)


def test_accept_from_after_seq_sets_a_floor() -> None:
    """``accept_from(sender, after_seq=N)`` refuses sequence numbers up to N and accepts N + 1."""
    rx = Session(KEY, "r0.1", 0)
    rx.accept_from("driver", after_seq=5)
    tx = Session(KEY, "driver", DRIVER_RANK, first_seq=4)
    at_floor, above = tx.pack(Kind.CALL, 1), tx.pack(Kind.CALL, 2)
    with pytest.raises(ProtocolError, match="seq 5 <= 5"):
        rx.unpack(at_floor)
    assert rx.unpack(above).header.seq == 6


def test_accept_from_never_lowers_a_floor() -> None:
    """Re-accepting a sender with a smaller ``after_seq`` keeps the higher floor."""
    rx = Session(KEY, "driver", DRIVER_RANK)
    rx.accept_from("r0.1", after_seq=9)
    rx.accept_from("r0.1", after_seq=2)
    with pytest.raises(ProtocolError, match="seq 9 <= 9"):
        rx.unpack(Session(KEY, "r0.1", 0, first_seq=8).pack(Kind.READY))


# --- headers ---------------------------------------------------------------------------------------


def test_header_round_trip_with_driver_rank_and_unicode_sender() -> None:
    """``pack_header``/``parse_header`` are inverse; rank -1 and non-ASCII names survive."""
    raw = protocol.pack_header(Kind.CANCEL, 2**40, DRIVER_RANK, 2**63, "drïver")
    assert raw[:1] == b"\x02" and len(raw) == struct.calcsize("!BBQiQH") + len("drïver".encode())
    assert protocol.parse_header(raw) == protocol.Header(Kind.CANCEL, 2**40, -1, 2**63, "drïver")


def _raw_header(version: int = 2, kind: int = int(Kind.READY), sender: bytes = b"r0.1") -> bytes:
    return struct.pack("!BBQiQH", version, kind, 0, 0, 1, 0) + sender


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"", "too short"),
        (_raw_header()[:23], "too short"),
        (_raw_header(version=3), "version 3"),
        (_raw_header(version=0), "version 0"),
        (_raw_header(kind=0), "unknown message kind 0"),
        (_raw_header(kind=23), "unknown message kind 23"),  # one past the last kind (REFUSED = 22)
        (_raw_header(kind=255), "unknown message kind 255"),
        (_raw_header(sender=b"\xff\xfe"), "not UTF-8"),
    ],
    ids=["empty", "truncated", "version 3", "version 0", "kind 0", "kind 23", "kind 255", "bad utf-8"],
)
def test_signed_but_malformed_header_is_refused(header: bytes, reason: str) -> None:
    """A header that passes the signature check but does not parse raises ``ProtocolError``."""
    with pytest.raises(ProtocolError, match=reason):
        Session(KEY, "driver", DRIVER_RANK).unpack(_signed([header, b"payload"]))


def test_every_kind_round_trips() -> None:
    """All message kinds (1..22) pack and parse; values are dense (the wire format relies on them)."""
    tx, rx = _pair()
    assert [rx.unpack(tx.pack(k)).kind for k in Kind] == list(Kind)
    assert [int(k) for k in Kind] == list(range(1, 23))


# --- (de)serialisation -----------------------------------------------------------------------------


def test_dumps_carries_closures_by_value() -> None:
    """cloudpickle serialises lambdas and closures, which plain pickle cannot."""
    base = 3
    fn = protocol.loads(protocol.dumps(lambda x: x + base))
    assert fn(4) == 7


def test_code_sent_by_value_keeps_its_file_and_line() -> None:
    """A warning or traceback from a function of the driver's script names the script and line in
    a rank, as in-process (cloudpickle alone writes "<dynamic-code>", and no source line shows)."""

    def warns() -> None:
        warnings.warn("from the script", UserWarning, stacklevel=1)

    sent = protocol.loads(protocol.dumps(warns))
    assert sent is not warns  # a closure: by value
    assert sent.__code__.co_filename == __file__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sent()
    assert (caught[0].filename, caught[0].lineno) == (__file__, warns.__code__.co_firstlineno + 1)


# --- server-sent events ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Point:
    x: int
    y: float


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": 1, "b": [True, None, "s"]}, {"a": 1, "b": [True, None, "s"]}),
        ([1, "two", False], [1, "two", False]),
        ("text", "text"),
        (3, 3),
        (True, True),
        (None, None),
        (1.5, 1.5),
        ((1, 2), [1, 2]),
        ({1: "int key"}, {"1": "int key"}),
        ([math.nan, math.inf, -math.inf], [None, None, None]),
        (_Point(1, math.nan), {"x": 1, "y": None}),
        ({"p": [_Point(2, 0.5)]}, {"p": [{"x": 2, "y": 0.5}]}),
    ],
)
def test_to_jsonable_plain_values(value: object, expected: object) -> None:
    """Plain data passes through; tuples become lists, keys strings, non-finite floats null."""
    assert protocol.to_jsonable(value) == expected


def test_encode_text_event_is_one_compact_sse_event() -> None:
    """The event is ``data: <compact json>`` and a blank line, with NaN as null."""
    event = protocol.encode_text_event({"loss": math.nan, "step": 3, "name": "é"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert event == b'data: {"loss":null,"step":3,"name":"\\u00e9"}\n\n'
    assert json.loads(event[len(b"data: ") :]) == {"loss": None, "step": 3, "name": "é"}


def test_unencodable_value_names_its_path() -> None:
    """An object with no JSON form raises ``TextEventError`` saying where it sits."""
    with pytest.raises(TextEventError, match=r"item\['a'\]\[1\] is a builtins.object"):
        protocol.encode_text_event({"a": [1, object()]})


def test_unencodable_top_level_value() -> None:
    """The path of a bare value is ``item``; sets are not silently turned into lists."""
    with pytest.raises(TextEventError, match=r"^item is a builtins.set"):
        protocol.to_jsonable({1, 2})


def test_numpy_arrays_become_fal_media_objects() -> None:
    """Arrays become ``application/ndarray`` objects (``numpy.save`` bytes); numpy scalars numbers."""
    np = pytest.importorskip("numpy")
    out = protocol.to_jsonable({"a": np.array([[1.0, np.nan]]), "s": np.int64(4)})
    assert out["s"] == 4
    a = out["a"]
    assert (a["content_type"], a["shape"], a["dtype"], a["data"]) == ("application/ndarray", [1, 2], "float64", None)
    prefix = "data:application/ndarray;base64,"
    assert a["url"].startswith(prefix)
    back = np.load(io.BytesIO(base64.b64decode(a["url"][len(prefix) :])), allow_pickle=False)
    assert np.array_equal(back, np.array([[1.0, np.nan]]), equal_nan=True)


def test_object_arrays_are_refused_with_their_path() -> None:
    """``numpy.save`` would pickle an object array: refused, naming where it sits."""
    np = pytest.importorskip("numpy")
    with pytest.raises(TextEventError, match=r"item\['a'\] is a numpy array of dtype object"):
        protocol.to_jsonable({"a": np.array([object()])})


@pytest.mark.parametrize(("fmt", "mime"), [("png", "png"), ("jpeg", "jpeg"), ("JPG", "jpeg")])
def test_pil_images_become_fal_image_objects(fmt: str, mime: str) -> None:
    """PIL images (RGBA too, even as JPEG) become ``{"content_type", "width", "height", "data", "url"}``."""
    image_mod = pytest.importorskip("PIL.Image")
    out = protocol.to_jsonable(image_mod.new("RGBA", (4, 3), (255, 0, 0, 128)), image_format=fmt)
    assert list(out) == ["content_type", "width", "height", "data", "url"]
    assert (out["content_type"], out["width"], out["height"], out["data"]) == (f"image/{mime}", 4, 3, None)
    assert out["url"].startswith(f"data:image/{mime};base64,")


def test_unknown_image_format_is_refused() -> None:
    """Only jpeg and png are offered."""
    image_mod = pytest.importorskip("PIL.Image")
    with pytest.raises(TextEventError, match="image_format"):
        protocol.to_jsonable(image_mod.new("RGB", (2, 2)), image_format="gif")


def test_protocol_module_imports_neither_zmq_nor_torch() -> None:
    """``lightdist/protocol.py`` on its own pulls in no zmq and no torch.

    The package ``__init__`` imports the runner (and with it zmq), so the module is loaded under a
    bare ``lightdist`` package object to test what the protocol module itself imports.
    """
    package_dir = Path(protocol.__file__).parent
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('lightdist'); pkg.__path__ = [sys.argv[1]]; sys.modules['lightdist'] = pkg\n"
        "import lightdist.protocol\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'torch'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(package_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- Channel on inproc:// --------------------------------------------------------------------------


@dataclasses.dataclass
class _Link:
    router: Channel
    dealer: Channel
    identity: bytes


@pytest.fixture
def link() -> Iterator[_Link]:
    """A driver ROUTER and a rank DEALER on ``inproc://``, each with its own session."""
    ctx = zmq.Context()
    channels: list[Channel] = []
    try:
        driver = Session(KEY, "driver", DRIVER_RANK)
        driver.peers = set()
        router, address = Channel.bind_router(ctx, "inproc://lightdist-test", driver)
        channels.append(router)
        router.accept_from("r0.1")
        rank = Session(KEY, "r0.1", 0)
        rank.accept_from("driver")
        dealer = Channel.connect_dealer(ctx, address, b"r0.1", rank)
        channels.append(dealer)
        yield _Link(router, dealer, b"r0.1")
    finally:
        for channel in channels:
            channel.close()
        ctx.term()


def test_channel_round_trip_both_ways(link: _Link) -> None:
    """DEALER → ROUTER carries the identity; ROUTER → DEALER reaches the named peer."""
    link.dealer.send(Kind.RESULT, 4, [b"a", b"b"])
    ident, msg = link.router.recv(WAIT_S)
    assert ident == link.identity
    assert (msg.kind, msg.header.call, msg.header.sender, msg.payload) == (Kind.RESULT, 4, "r0.1", (b"a", b"b"))
    link.router.send(Kind.CALL, 5, [b"c"], to=[ident])
    ident, msg = link.dealer.recv(WAIT_S)
    assert ident is None and (msg.kind, msg.header.call, msg.payload) == (Kind.CALL, 5, (b"c",))


def test_router_send_to_unknown_identity_is_skipped(link: _Link) -> None:
    """A peer that is gone does not make ``send`` raise; the others still get the message."""
    link.router.send(Kind.CANCEL, 1, to=[b"gone", link.identity])
    _, msg = link.dealer.recv(WAIT_S)
    assert msg.kind is Kind.CANCEL


def test_drain_drops_bad_frames_counts_them_and_keeps_good_ones(link: _Link) -> None:
    """Garbage, forgeries and replays are dropped and counted; the good messages after them arrive."""
    good = Session(KEY, "r0.1", 0, first_seq=100)
    replay = good.pack(Kind.PONG)
    bad = [
        [b"garbage"],
        [os.urandom(32), protocol.pack_header(Kind.RESULT, 1, 0, 500, "r0.1"), b"x"],
        Session(OTHER_KEY, "r0.1", 0, first_seq=200).pack(Kind.RESULT, 1),
        Session(KEY, "intruder", 0).pack(Kind.RESULT, 1),
    ]
    raw = link.dealer.socket
    raw.send_multipart(replay)
    for frames in bad:
        raw.send_multipart(frames)
    raw.send_multipart(replay)  # the second copy is a replay
    raw.send_multipart(good.pack(Kind.RESULT, 2, [b"ok"]))
    got: list[tuple[bytes | None, protocol.Message]] = []
    assert wait_until(lambda: got.extend(link.router.drain()) or len(got) >= 2, WAIT_S)
    assert [m.kind for _, m in got] == [Kind.PONG, Kind.RESULT] and got[1][1].payload == (b"ok",)
    assert link.router.rejected == len(bad) + 1
    assert "replayed" in link.router.last_rejection


def test_drain_returns_nothing_when_idle(link: _Link) -> None:
    """``drain`` never blocks: with nothing waiting it returns an empty list."""
    assert link.router.drain() == [] and link.router.rejected == 0


def test_recv_raises_timeout_error_at_the_deadline(link: _Link) -> None:
    """No message: ``recv`` raises ``TimeoutError`` (never returns None), for 0 and short timeouts."""
    with pytest.raises(TimeoutError):
        link.router.recv(0)
    with pytest.raises(TimeoutError, match="0.05"):
        link.router.recv(0.05)


def test_recv_skips_rejected_frames_and_keeps_extra_messages(link: _Link) -> None:
    """``recv`` returns verified messages one at a time, in order, ignoring rejected frames."""
    raw = link.dealer.socket
    raw.send_multipart([b"junk", b"junk"])
    link.dealer.send(Kind.STREAM_ITEM, 1, [b"1"])
    link.dealer.send(Kind.STREAM_ITEM, 1, [b"2"])
    first = link.router.recv(WAIT_S)[1]
    second = link.router.recv(WAIT_S)[1]
    assert (first.payload, second.payload) == ((b"1",), (b"2",)) and link.router.rejected == 1


def test_close_twice_is_safe(link: _Link) -> None:
    """Both sockets use linger 0; ``close`` closes the socket and may be called again."""
    assert link.router.socket.getsockopt(zmq.LINGER) == 0 and link.dealer.socket.getsockopt(zmq.LINGER) == 0
    link.dealer.close()
    link.dealer.close()
    assert link.dealer.socket.closed


def test_self_containing_item_is_a_text_event_error() -> None:
    """A list that contains itself fails with TextEventError (the caller's contract), not RecursionError."""
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(TextEventError, match="contains itself"):
        protocol.encode_text_event(loop)


def test_keys_equal_as_json_strings_are_refused() -> None:
    """{1: ..., "1": ...} would silently lose one value in JSON: refused, naming the keys."""
    with pytest.raises(TextEventError, match="equal as JSON strings"):
        protocol.encode_text_event({1: "a", "1": "b"})


def test_newcomers_are_accepted_by_prefix_only() -> None:
    """A driver waiting for agents accepts signed HELLOs from unknown ``agent.`` senders, nothing else."""
    rx = Session(KEY, "driver", DRIVER_RANK)
    rx.accept_from("r0.1")
    rx.newcomer_prefix = "agent."
    hello = Session(KEY, "agent.h1.abc", -2).pack(Kind.HELLO, 0, [b"{}"])
    assert rx.unpack(hello).header.sender == "agent.h1.abc"
    with pytest.raises(ProtocolError, match="replayed"):
        rx.unpack(hello)  # the sequence floor applies to newcomers too
    with pytest.raises(ProtocolError, match="unknown sender"):
        rx.unpack(Session(KEY, "r9.1", 9).pack(Kind.READY))
    with pytest.raises(ProtocolError, match="bad signature"):
        rx.unpack(Session(os.urandom(32), "agent.evil", -2).pack(Kind.HELLO, 0, [b"{}"]))


def test_bulk_frames_are_signed_through_their_digests() -> None:
    """Large frames travel outside the MAC; their digests are a signed payload frame, so an altered
    bulk frame is refused by ``verify_bulk`` and a changed bulk count by the signature check."""
    key = protocol.new_key()
    tx, rx = Session(key, "r0.1", 0), Session(key, "driver", -1)
    bulk = [b"\x01" * 100_000, b"\x02" * 70_000]
    frames = tx.pack(Kind.RESULT, 3, [b"meta", protocol.bulk_digests(bulk)], bulk=bulk)
    msg = rx.unpack(frames)
    assert msg.header.bulk == 2 and msg.bulk == tuple(bulk) and msg.payload == (b"meta", protocol.bulk_digests(bulk))
    protocol.verify_bulk(msg.payload[-1], msg.bulk)
    altered = rx.unpack(
        tx.pack(Kind.RESULT, 4, [b"meta", protocol.bulk_digests(bulk)], bulk=[bulk[0], b"\x03" * 70_000])
    )
    with pytest.raises(ProtocolError, match="bulk frame 1 does not match"):
        protocol.verify_bulk(altered.payload[-1], altered.bulk)
    frames = tx.pack(Kind.RESULT, 5, [b"meta", protocol.bulk_digests(bulk)], bulk=bulk)
    with pytest.raises(ProtocolError, match="bad signature"):  # a bulk frame moved into the signed part
        rx.unpack([frames[0], frames[1][: -len("r0.1")].replace(b"\x00\x02", b"\x00\x01") + b"r0.1", *frames[2:]])
