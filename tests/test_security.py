"""A rogue local client attacks a real 2-rank pool's driver socket.

It connects its own DEALER to the driver's ROUTER and sends unsigned pickles, forged and replayed
frames and random bytes. Each attack must be dropped before anything is unpickled (a pickle that
would create a marker file proves it), counted in ``Channel.rejected``, and leave the pool serving.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import zmq

from lightdist import DistributedRunner, protocol
from lightdist._pool import Pool
from lightdist.errors import ProtocolError
from lightdist.protocol import Kind, Message, Session
from tests.conftest import wait_until

WAIT_S = 10.0
CALL_TIMEOUT_S = 30.0


class _Marker:
    """Unpickling this (anywhere, in any process) creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture
def pool(echo_pool: DistributedRunner) -> Pool:
    assert echo_pool._pool is not None
    return echo_pool._pool


@pytest.fixture
def rogue(pool: Pool) -> Iterator[zmq.Socket]:
    """A DEALER of our own on the driver's socket, as any local process of the same user could open."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"rogue")
        sock.connect(pool.address)
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture
def evil(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded (checked to be armed, so the tests can fail)."""
    armed = marker.with_name("armed")
    pickle.loads(pickle.dumps(_Marker(armed)))
    assert armed.exists()
    return pickle.dumps(_Marker(marker))


@dataclasses.dataclass
class _Spy:
    """What the driver's session accepted (frames) and rejected (reasons), in order."""

    accepted: list[list[bytes]]
    rejected: list[str]


@pytest.fixture
def spy(pool: Pool) -> Iterator[_Spy]:
    """Wraps the driver session's ``unpack`` (called on the pool's I/O thread) for this test only."""
    session = pool.channel.session
    original = session.unpack
    seen = _Spy([], [])

    def recording(frames: Sequence[bytes]) -> Message:
        try:
            msg = original(frames)
        except ProtocolError as exc:
            seen.rejected.append(str(exc))
            raise
        seen.accepted.append([bytes(f) for f in frames])
        return msg

    session.unpack = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del session.unpack  # back to the class's method


def _attack(
    runner: DistributedRunner, pool: Pool, rogue: zmq.Socket, spy: _Spy, messages: list[list[bytes]]
) -> list[str]:
    """Send ``messages`` and a sentinel; once the sentinel is rejected (so every message before it
    was handled), check the pool still serves and return the rejection reasons of ``messages``."""
    sentinel = f"sentinel.{os.urandom(4).hex()}"  # signed, but never an allowed sender
    start, before = len(spy.rejected), pool.channel.rejected
    for frames in [*messages, Session(pool.key, sentinel, 0).pack(Kind.PING)]:
        rogue.send_multipart(frames)
    assert wait_until(lambda: any(sentinel in r for r in spy.rejected[start:]), WAIT_S), spy.rejected[start:]
    *reasons, last = spy.rejected[start:]
    assert sentinel in last
    assert pool.channel.rejected == before + len(reasons) + 1
    _assert_serving(runner)
    return reasons


def _assert_serving(runner: DistributedRunner) -> None:
    token = os.urandom(8).hex()
    out = runner.invoke_sync({"token": token}, timeout=CALL_TIMEOUT_S)
    assert out["rank"] == 0 and out["payload"] == {"token": token}


def _fake_sig_cases(sender: str, evil: bytes) -> dict[str, list[bytes]]:
    header = protocol.pack_header(Kind.FAILED, 0, 0, 10**6, sender)
    return {
        "pickle alone": [evil],
        "pickle in every frame": [evil, evil, evil],
        "zero signature": [b"\x00" * 32, header, evil],
        "random signature": [os.urandom(32), header, evil],
        "pickle as signature": [evil, header, evil],
        "other key": Session(b"x" * 32, sender, 0, first_seq=10**6).pack(Kind.FAILED, 0, [evil]),
    }


@pytest.mark.parametrize("case", sorted(_fake_sig_cases("r0.1", b"")))
def test_unsigned_pickle_is_never_loaded(
    echo_pool: DistributedRunner, pool: Pool, rogue: zmq.Socket, spy: _Spy, marker: Path, evil: bytes, case: str
) -> None:
    """A pickle sent without the key, bare or behind a fake signature and a well-formed header of a
    real rank, is rejected unread; FAILED payloads are unpickled at once when accepted, so a missed
    check would create the marker."""
    frames = _fake_sig_cases(pool._senders[0], evil)[case]
    [reason] = _attack(echo_pool, pool, rogue, spy, [frames])
    assert reason == "bad signature" or reason.startswith("expected at least 2 frames")
    assert not marker.exists()


def test_forged_old_sequence_from_a_live_rank_is_a_replay(
    echo_pool: DistributedRunner, pool: Pool, rogue: zmq.Socket, spy: _Spy, marker: Path, evil: bytes
) -> None:
    """With the real key and a live rank's sender name, seq 1 (its READY) is refused as a replay."""
    forger = Session(pool.key, pool._senders[0], 0)
    [reason] = _attack(echo_pool, pool, rogue, spy, [forger.pack(Kind.FAILED, 0, [evil])])
    assert reason.startswith(f"replayed frame from {pool._senders[0]!r}: seq 1 <= ")
    assert not marker.exists()


def test_captured_replies_replayed_verbatim_are_rejected(
    echo_pool: DistributedRunner, pool: Pool, rogue: zmq.Socket, spy: _Spy
) -> None:
    """The exact RESULT frames both ranks sent for a finished call, replayed, are all refused."""
    _assert_serving(echo_pool)
    captured = list(spy.accepted)
    headers = [protocol.parse_header(frames[1]) for frames in captured]
    assert sorted((h.kind, h.rank) for h in headers) == [(Kind.RESULT, 0), (Kind.RESULT, 1)]
    reasons = _attack(echo_pool, pool, rogue, spy, captured)
    assert [r.split(":")[0] for r in reasons] == [f"replayed frame from {h.sender!r}" for h in headers]


def test_identical_frames_sent_twice_second_rejected(
    echo_pool: DistributedRunner, pool: Pool, rogue: zmq.Socket, spy: _Spy
) -> None:
    """On the live driver a signed message from an allowed sender is accepted once, then refused;
    after ``forget`` even fresh messages from it are refused.

    The sender is a temporary extra peer (not a rank, so the pool ignores what it accepts): a fresh
    sequence number from a *rank's* sender would be accepted and would desynchronise that rank.
    """
    sender = "rogue.1"
    session = Session(pool.key, sender, 0)
    pool.channel.accept_from(sender)
    try:
        frames = session.pack(Kind.PONG)
        assert _attack(echo_pool, pool, rogue, spy, [frames, frames]) == [f"replayed frame from {sender!r}: seq 1 <= 1"]
    finally:
        pool.channel.forget(sender)
    assert _attack(echo_pool, pool, rogue, spy, [session.pack(Kind.PONG)]) == [f"stale or unknown sender {sender!r}"]


def test_signed_frame_from_unknown_sender_is_rejected(
    echo_pool: DistributedRunner, pool: Pool, rogue: zmq.Socket, spy: _Spy, marker: Path, evil: bytes
) -> None:
    """Even with the key, a sender the driver never spawned (a future incarnation) is refused."""
    frames = Session(pool.key, "r0.999", 0).pack(Kind.FAILED, 0, [evil])
    assert _attack(echo_pool, pool, rogue, spy, [frames]) == ["stale or unknown sender 'r0.999'"]
    assert not marker.exists()


def test_random_bytes_are_rejected(echo_pool: DistributedRunner, pool: Pool, rogue: zmq.Socket, spy: _Spy) -> None:
    """Messages of 1 to 6 random frames (some 32 bytes long, some empty) are each dropped and counted."""
    rng = random.Random(1234)
    messages = [
        [os.urandom(rng.choice([0, 1, 32, 33, 500])) for _ in range(n_frames)] for n_frames in [1, 2, 3, 4, 5, 6] * 5
    ]
    reasons = _attack(echo_pool, pool, rogue, spy, messages)
    assert len(reasons) == len(messages)
    assert all(r == "bad signature" or r.startswith("expected at least 2 frames") for r in reasons)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) with a LISTEN socket on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_the_rendezvous_store_listens_on_the_pool_address_only(pool: Pool) -> None:
    # torch's TCPStore alone listens on every interface ("::"), reachable from the network without
    # any authentication; the pool hands it a socket bound to master_addr (127.0.0.1 here).
    addresses = _listening_addresses(pool._store.port)
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, little-endian hex
