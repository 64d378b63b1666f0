"""The bodies of the protocol's messages (:mod:`lightdist.protocol` owns the frames, signing and
kinds): one typed encode/decode pair per kind, and the wire names of the driver and the agents.

No caller builds or parses a body by hand: the driver, the ranks, the template and the agents all
go through these functions, so a body's shape is defined once. Bodies between the driver and an
agent are JSON (an agent may run another build of Python); bodies that only our own processes of
one build read (a rank's bootstrap, a reach report, an error report) are pickled. Every body is
parsed only after its message's signature was checked (see :class:`lightdist.protocol.Session`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import sys
import traceback
from typing import Any

from lightdist import protocol
from lightdist.errors import WorkerError

__all__ = [
    "AGENT_PREFIX",
    "DRIVER_SENDER",
    "Assignment",
    "HostEvent",
    "KillOrder",
    "RankBoot",
    "adopt_sys_path",
    "decode_error",
    "driver_sys_path",
    "encode_error",
]

DRIVER_SENDER = "driver"  # the driver's sender name (and ZMQ identity)
AGENT_PREFIX = "agent."  # sender names of agents start with this; ranks' start with "r<rank>."


def driver_sys_path() -> list[str]:
    """The driver's import path as ranks and the template get it: "" (the script's directory or the
    current one) made absolute, so imports resolve alike wherever the other process runs from."""
    cwd = os.getcwd()
    return [path or cwd for path in sys.path]


def adopt_sys_path(paths: list[str] | tuple[str, ...]) -> None:
    """In a rank or template: put the driver's import path (:func:`driver_sys_path`) first."""
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


# --- SPAWN: a rank's bootstrap ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RankBoot:
    """Everything a forked rank needs to join the pool. Built once per rank life by the driver
    (:meth:`lightdist._pool.Pool._boot`); a host adjusts it with :func:`dataclasses.replace`
    (an agent sets the local layout and its client keys)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    sender: str  # this life's sender name, also its ZMQ identity
    driver_seq: int  # the driver's sequence number when this life was made (older messages are replays)
    key: bytes
    address: str  # the driver's ROUTER
    store_host: str
    store_port: int
    store_prefix: str
    start_timeout: float
    pg_timeout: float
    accelerator: str
    backend: str | None
    worker_cls: bytes  # cloudpickled; unpickled only in the rank
    setup_kwargs: bytes
    cwd: str | None
    sys_path: tuple[str, ...]
    argv: tuple[str, ...]  # worker code from a script may read its arguments
    shm_probe: tuple[int, int] | None = None  # (pid, fd) of the driver's probe memfd, on one host
    node_rank: int = 0  # the host's index in a pool across hosts
    curve: Any = None  # an agent's client keys: its ranks connect with them
    max_frame_bytes: int | None = None  # the driver refuses larger frames: check before sending
    stream_window: tuple[int, int] = (1024, 64 << 20)  # stream items, bytes unconsumed by the caller


def encode_spawn(boot: RankBoot) -> bytes:
    return pickle.dumps(boot, protocol=5)


def decode_spawn(payload: bytes) -> RankBoot:
    boot = pickle.loads(payload)  # signed by the driver: trusted
    if not isinstance(boot, RankBoot):
        raise TypeError(f"SPAWN carries {type(boot).__name__}, not a RankBoot")
    return boot


# --- HELLO: an agent's host facts ------------------------------------------------------------------
def encode_hello(facts: dict[str, Any]) -> bytes:
    return json.dumps(facts).encode()


def decode_hello(payload: bytes) -> dict[str, Any]:
    facts = json.loads(payload)
    if not isinstance(facts, dict) or not isinstance(facts.get("nproc"), int) or facts["nproc"] < 1:
        raise ValueError(f"HELLO without a positive 'nproc': {facts!r}")
    return facts


# --- ASSIGN: a host's ranks and lease --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Assignment:
    ranks: list[int]  # global ranks in local-rank order; empty for a spare
    node_rank: int  # -1 for a spare
    num_nodes: int
    lease_s: float  # silence from the driver after which the agent kills its ranks and exits
    heartbeat_s: float
    imports: list[str]  # what the host's template imports before forking
    cwd: str | None


def encode_assign(assignment: Assignment) -> bytes:
    return json.dumps(dataclasses.asdict(assignment)).encode()


def decode_assign(payload: bytes) -> Assignment:
    return Assignment(**json.loads(payload))


# --- KILL: signal some of a host's ranks -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KillOrder:
    ranks: list[int]
    signal: int


def encode_kill(order: KillOrder) -> bytes:
    return json.dumps(dataclasses.asdict(order)).encode()


def decode_kill(payload: bytes) -> KillOrder:
    return KillOrder(**json.loads(payload))


# --- HOST_EVENT: what happened on an agent's host --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HostEvent:
    """``ev``: ``spawned`` (rank, pid, sender), ``exit`` (also code, signal), ``lost`` (the
    host's template failed; detail) or ``left`` (the agent is stopping on its own, e.g. its
    launcher sent SIGTERM; detail): the driver need not wait for the heartbeat to miss it."""

    ev: str
    rank: int = -1
    pid: int = 0
    sender: str = ""
    code: int | None = None
    signal: int | None = None
    detail: str = ""


def encode_host_event(event: HostEvent) -> bytes:
    return json.dumps(dataclasses.asdict(event)).encode()


def decode_host_event(payload: bytes) -> HostEvent:
    event = HostEvent(**json.loads(payload))
    if event.ev not in ("spawned", "exit", "lost", "left"):
        raise ValueError(f"unknown host event {event.ev!r}")
    return event


# --- PING / PONG between the driver and an agent: a numbered heartbeat, echoed ----------------------
def encode_ping(number: int) -> bytes:
    """A PING's number; the agent's PONG echoes it, so the driver knows which PING it answers."""
    return struct.pack("!Q", number)


def decode_ping(payload: bytes) -> int:
    return int(struct.unpack("!Q", payload)[0])


# --- EXIT from the driver to an agent: why the pool ended ------------------------------------------
def encode_farewell(failure: str | None) -> bytes:
    """``failure``: None when the pool was stopped, else what ended it (the agent exits 75 then, so
    that a launcher restarts it for the pool's next start)."""
    return json.dumps({"failure": failure}).encode()


def decode_farewell(payload: bytes) -> str | None:
    failure = json.loads(payload).get("failure")
    return None if failure is None else str(failure)


# --- REBUILD: join a fresh group under this store prefix -------------------------------------------
def encode_rebuild(store_prefix: str) -> bytes:
    return store_prefix.encode()


def decode_rebuild(payload: bytes) -> str:
    return payload.decode()


# --- READY: what a rank can reach out of band ------------------------------------------------------
def encode_reach(report: dict[str, Any]) -> bytes:
    return pickle.dumps(report, protocol=5)


def decode_reach(payload: bytes) -> dict[str, Any]:
    return dict(pickle.loads(payload))


# --- CALL: the envelope (the payload and its tensors follow: see _calls.encode_call) ---------------
def encode_envelope(streaming: bool, cwd: str | None, manifest: dict[str, Any], reply_transport: str) -> bytes:
    """Plain data a rank reads before the payload: the driver's import path must be in place before
    the payload, which may hold objects of modules only that path can import, is unpickled."""
    envelope = {
        "streaming": streaming,
        "sys_path": driver_sys_path(),
        "cwd": cwd or os.getcwd(),
        "tensors": manifest,
        "reply_transport": reply_transport,
    }
    return pickle.dumps(envelope, protocol=5)


def decode_envelope(payload: bytes) -> dict[str, Any]:
    return dict(pickle.loads(payload))


# --- CREDIT: stream items the caller consumed (flow control) ---------------------------------------
_CREDIT = struct.Struct("!QQ")


def encode_credit(items: int, nbytes: int) -> bytes:
    return _CREDIT.pack(items, nbytes)


def decode_credit(payload: bytes) -> tuple[int, int]:
    items, nbytes = _CREDIT.unpack(payload)
    return int(items), int(nbytes)


# --- OUTPUT: ranks' output from an agent's host; REFUSED: why an agent was not attached -----------
_STREAMS = ("stdout", "stderr")


def encode_output(stream: str, text: str) -> list[bytes]:
    return [stream.encode(), text.encode("utf-8", "replace")]


def decode_output(payload: tuple[bytes, ...]) -> tuple[str, str]:
    stream = payload[0].decode()
    if stream not in _STREAMS:
        raise ValueError(f"OUTPUT for an unknown stream {stream!r}")
    return stream, payload[1].decode("utf-8", "replace")


def encode_refused(why: str) -> bytes:
    return why.encode()


def decode_refused(payload: tuple[bytes, ...]) -> str:
    return payload[0].decode("utf-8", "replace") if payload else "no reason given"


# --- RESULT: the reply's meta frame ------------------------------------------------------------------
def encode_result_meta(dropped: list[int], manifest: dict[str, Any]) -> bytes:
    """Resident keys this rank dropped, and the manifest of the result's tensors (see _tensors)."""
    return pickle.dumps({"dropped": dropped, "tensors": manifest}, protocol=5)


def decode_result_meta(payload: bytes) -> tuple[list[int], dict[str, Any]]:
    meta = pickle.loads(payload)
    return list(meta["dropped"]), meta["tensors"]


# --- ERROR / FAILED: an exception as plain data ----------------------------------------------------
_COLLECTIVE_FILES = (f"torch{os.sep}distributed{os.sep}", f"torch{os.sep}nn{os.sep}parallel{os.sep}")
_COLLECTIVE_MARKERS = ("gloo", "nccl", "processgroup", "connection closed by peer", "connection reset by peer")


def encode_error(exc: BaseException) -> bytes:
    """An exception as plain data: the driver can always read it, whatever classes it has.

    ``in_collective`` says whether it came out of a collective (a timed-out or failed one, in
    torch.distributed or in DDP's reducer): the group may then be unusable, so the driver rebuilds
    it before the next call.
    """
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    report = {"exc_type": name, "message": str(exc), "traceback": tb, "in_collective": _from_collective(exc)}
    return protocol.dumps(report)


def decode_error(rank: int, payload: bytes) -> tuple[WorkerError, bool]:
    """The :class:`WorkerError` a rank's report describes, and whether it came out of a collective."""
    report = protocol.loads(payload)
    err = WorkerError(rank, report["exc_type"], report["message"], report["traceback"])
    return err, bool(report.get("in_collective"))


def _from_collective(exc: BaseException) -> bool:
    # Walk the whole chain (user code often re-raises: `raise X from exc`). DDP runs its
    # all-reduce from C++ autograd, so a failure there shows no torch.distributed frame: the
    # backends' messages and torch's Dist*Error types tell instead.
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith("torch.distributed") or type(current).__name__.startswith("Dist"):
            return True
        frames = traceback.extract_tb(current.__traceback__)
        if any(f.filename and any(m in f.filename for m in _COLLECTIVE_FILES) for f in frames):
            return True
        message = str(current).lower()
        if any(marker in message for marker in _COLLECTIVE_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False
