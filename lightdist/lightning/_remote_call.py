"""A Trainer call run on a lightdist server: the bytes both sides exchange, and the server's side.

``PoolStrategy(server=URL)`` sends the same payload its launcher gives a local pool (the Trainer,
its entry point and the arguments, plus seed variables and torch flags) to ``POST /v1/calls``
(see ``docs/server.md``); the server runs it on its own pool with :func:`execute_call` and hands
back the reply the launcher applies to the client's Trainer and model.

The call (:func:`encode_call`)::

    MAGIC | u32 header length | header (JSON) | payload (cloudpickle, the client's modules by value)

The header is plain data the server reads before unpickling anything (:func:`call_header`): the
client's working directory (where the job runs: relative paths, logs, checkpoints), the entry
point's name and the versions that must match for the pickle to mean the same on both sides.

The result (:func:`encode_result`) is a pickle of ``{"out": rank 0's reply, "interrupted": bool}``.
A local pool writes what training changed into the driver's own tensors; the client's tensors
never reached the server, so ``out["weights"]`` carries every entry of the model's state dict
that the call changed on the server's copy (see :func:`execute_call`).

Errors travel as data (:func:`error_record`, :func:`error_from_record`): a client ``except``\\ s
``WorkerError`` and ``WorkerDiedError`` exactly as with a local pool.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import struct
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

import lightdist
from lightdist import _byvalue, protocol
from lightdist.errors import WorkerDiedError, WorkerError
from lightdist.lightning._worker import _model_arg

if TYPE_CHECKING:
    from lightdist.runner import DistributedRunner

__all__ = [
    "CallHeader",
    "RemoteCallError",
    "call_header",
    "decode_call",
    "decode_result",
    "encode_call",
    "encode_result",
    "error_from_record",
    "error_record",
    "execute_call",
]

MAGIC = b"lightdist-call-1\n"
_LEN = struct.Struct("!I")


class RemoteCallError(RuntimeError):
    """The server could not run the call (not a rank's error: those are ``WorkerError``).

    Attributes: ``exc_type`` (the server-side exception's type name), ``message`` and
    ``remote_traceback``."""

    def __init__(self, exc_type: str, message: str, remote_traceback: str = "") -> None:
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        text = f"the lightdist server failed the call: {exc_type}: {message}"
        if remote_traceback:
            text += f"\n\n--- server traceback ---\n{remote_traceback.rstrip()}"
        super().__init__(text)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.exc_type, self.message, self.remote_traceback))


@dataclasses.dataclass(frozen=True)
class CallHeader:
    """What a server learns about a call without unpickling it."""

    cwd: str  # the client's working directory: the job runs there
    command: str | None  # the entry point: "fit", "validate", "test" or "predict"
    versions: dict[str, str]  # python, torch, lightdist and the Lightning package: must match


def encode_call(payload: dict[str, Any]) -> bytes:
    """The launcher's payload as the bytes ``POST /v1/calls`` takes (client side)."""
    trainer = payload["job"][0]
    fn = trainer.state.fn.value if trainer is not None and trainer.state.fn is not None else None
    header = {"cwd": os.getcwd(), "command": fn, "versions": _versions(type(trainer).__module__)}
    head = json.dumps(header).encode()
    return MAGIC + _LEN.pack(len(head)) + head + _byvalue.dumps(payload)


def call_header(blob: bytes | memoryview) -> CallHeader:
    """The header of a call (server side; nothing is unpickled). Raises ``ValueError`` for bytes
    that are not a call."""
    header, _ = _split(blob)
    return header


def decode_call(blob: bytes | memoryview) -> tuple[CallHeader, dict[str, Any]]:
    """Header and payload of a call (server side). Checks first that the versions match the
    server's, which the pickled Trainer needs to mean the same here."""
    header, offset = _split(blob)
    package = next((name for name in header.versions if name not in ("python", "torch", "lightdist")), "lightning")
    ours = _versions(package)
    wrong = [
        f"{name} {theirs} but the server {ours.get(name)}"
        for name, theirs in header.versions.items()
        if ours.get(name) != theirs
    ]
    if wrong:
        raise ValueError(
            f"the client runs {', '.join(wrong)}; run the client in the server's environment "
            f"({sys.executable}) or start a server from the client's"
        )
    try:
        payload = protocol.loads(memoryview(blob)[offset:])  # type: ignore[arg-type]
    except ImportError as exc:
        raise ImportError(
            f"the server cannot load the call: {exc}. It imports installed packages by name: install that "
            "package in the server's environment (the client's own modules, outside site-packages, travel by value)"
        ) from exc
    if not isinstance(payload, dict) or "job" not in payload:
        raise ValueError("the call's payload is not a Trainer call")
    return header, payload


def encode_result(out: dict[str, Any] | None, interrupted: bool) -> bytes:
    """The reply of a call as ``GET /v1/jobs/{id}/result`` returns it (server side)."""
    return protocol.dumps({"out": out, "interrupted": interrupted})


def decode_result(blob: bytes) -> tuple[dict[str, Any] | None, bool]:
    """``(out, interrupted)`` of :func:`encode_result` (client side)."""
    result = protocol.loads(blob)
    return result["out"], bool(result["interrupted"])


def execute_call(
    blob: bytes, runner: DistributedRunner, on_event: Callable[[dict[str, Any]], None]
) -> tuple[bytes, bool]:
    """Run a client's call on ``runner`` (a started pool of ``TrainerWorker``); returns the result
    for ``GET /v1/jobs/{id}/result`` and whether the call was interrupted (cancelled).

    Runs in the server's job thread, with the working directory already set to
    ``call_header(blob).cwd``. ``on_event`` gets each progress event of rank 0 as the Lightning
    layer makes it (:mod:`lightdist.lightning.events`), then an ``end`` event. The server cancels
    with ``runner.interrupt()``: the ranks stop at a batch they agree on and the call still returns
    its state so far (``interrupted`` in the result). A rank's failure raises ``WorkerError`` /
    ``WorkerDiedError``; record it with :func:`error_record` (a client rebuilds it from that).

    Weights: the call is resident, so the pool writes what training changed into this process's
    copy of the model in place (bumping those tensors' version counters); the entries whose
    counter moved, plus the ones the ranks created, go back. Frozen weights and anything the
    call did not change stay here: the client has them already.
    """
    header, payload = decode_call(blob)
    trainer, _function, arguments = payload["job"]
    model = _model_arg(trainer, arguments)
    before = _tensor_versions(model)
    end: dict[str, Any] = {"event": "end", "fn": header.command, "interrupted": False, "error": None}
    try:
        out, interrupted = runner.invoke_interruptible(payload, on_item=on_event, resident=True)
        # runner.interrupt() from the server's cancel is not a Ctrl-C in this thread: the ranks'
        # state tells (they stopped at an agreed batch and finished as an interrupted run).
        interrupted = interrupted or _stopped(out)
        end["interrupted"] = interrupted
    except BaseException as exc:
        end["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise
    finally:
        on_event(end)
    if out is not None and model is not None:
        changed = _changed_entries(model, before)
        out["weights"] = {**changed, **(out["weights"] or {})}
    return encode_result(out, interrupted), interrupted


def error_record(exc: BaseException) -> dict[str, Any]:
    """A job's ``error`` for an exception out of :func:`execute_call` (JSON-able).

    ``type``, ``message``, ``traceback`` and ``rank`` as ``docs/server.md`` describes them (for a
    rank's error: the rank's exception type and traceback), plus ``raised`` (the lightdist exception
    to raise in the client) and, for a rank that died, ``exitcode``, ``signal`` and ``detail``."""
    if isinstance(exc, WorkerError):
        return {
            "type": exc.exc_type,
            "message": exc.message,
            "traceback": exc.remote_traceback,
            "rank": exc.rank,
            "raised": "WorkerError",
        }
    if isinstance(exc, WorkerDiedError):
        return {
            "type": "WorkerDiedError",
            "message": str(exc),
            "traceback": "",
            "rank": exc.rank,
            "raised": "WorkerDiedError",
            "exitcode": exc.exitcode,
            "signal": exc.signal,
            "detail": exc.detail,
        }
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__qualname__, "message": str(exc), "traceback": text, "rank": None, "raised": None}


def error_from_record(record: dict[str, Any]) -> Exception:
    """The exception a client raises for a failed call's ``error`` (the inverse of :func:`error_record`)."""
    raised = record.get("raised")
    kind = str(record.get("type") or "Exception")
    message = str(record.get("message") or "")
    trace = str(record.get("traceback") or "")
    rank = record.get("rank")
    if raised == "WorkerDiedError" and isinstance(rank, int):
        return WorkerDiedError(rank, record.get("exitcode"), record.get("signal"), str(record.get("detail") or ""))
    if isinstance(rank, int):  # a rank raised (also the server's CLI-job form, which has no "raised")
        return WorkerError(rank, kind, message, trace)
    return RemoteCallError(kind, message, trace)


def _split(blob: bytes | memoryview) -> tuple[CallHeader, int]:
    view = memoryview(blob)
    start = len(MAGIC)
    if bytes(view[:start]) != MAGIC or len(view) < start + _LEN.size:
        raise ValueError("not a lightdist call (a client of another lightdist version?)")
    (size,) = _LEN.unpack_from(view, start)
    end = start + _LEN.size + size
    try:
        raw = json.loads(bytes(view[start + _LEN.size : end]))
        header = CallHeader(cwd=str(raw["cwd"]), command=raw["command"], versions=dict(raw["versions"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"a lightdist call with a malformed header: {exc}") from None
    return header, end


def _versions(trainer_module: str) -> dict[str, str]:
    # The Lightning package the Trainer comes from: lightning, or the standalone pytorch_lightning.
    package = trainer_module.partition(".")[0]
    try:
        lightning_version = str(importlib.import_module(package).__version__)
    except (ImportError, AttributeError):
        lightning_version = "missing"
    return {
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "torch": str(torch.__version__),
        "lightdist": lightdist.__version__,
        package: lightning_version,
    }


def _stopped(out: dict[str, Any] | None) -> bool:
    state = out.get("state") if out is not None else None
    return getattr(getattr(state, "status", None), "value", None) == "interrupted"


def _tensor_versions(model: Any) -> dict[str, tuple[torch.Tensor, int]]:
    if model is None:
        return {}
    return {name: (t, t._version) for name, t in model.state_dict(keep_vars=True).items()}


def _changed_entries(model: Any, before: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    changed = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        start = before.get(name)
        if start is None or start[0] is not tensor or start[1] != tensor._version:
            changed[name] = tensor.detach()
    return changed
