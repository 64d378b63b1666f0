"""Exception types raised in the driver.

Worker failures come back over the wire as plain data (type name, message, formatted traceback),
never as pickled exception objects: the driver may not be able to import the worker's exception
class, and an error report must always be readable.
"""

from __future__ import annotations

import signal

__all__ = [
    "ConfigError",
    "PayloadError",
    "PoolClosedError",
    "ProtocolError",
    "SignatureError",
    "TextEventError",
    "WorkerDiedError",
    "WorkerError",
    "WorkerFailedError",
]


class WorkerFailedError(RuntimeError):
    """A call (or ``setup``) failed on a rank: it raised (:class:`WorkerError`) or its process, or
    its whole host, was lost (:class:`WorkerDiedError`). The call's work is lost either way; the
    pool recovers by itself (see docs/failures.md).

    Catch this to handle "the pool lost this call's work" in one place; the subclasses tell a
    crash (retrying an idempotent call is safe: the pool is repaired first) from an exception your
    code raised::

        try:
            out = runner.invoke_sync(payload)
        except WorkerDiedError:
            out = runner.invoke_sync(payload)   # a rank or a host was lost: run it again
        except WorkerFailedError as exc:
            log.error("rank %d failed: %s", exc.rank, exc)

    Attributes:
        rank: the rank that failed.
    """

    rank: int


class WorkerError(WorkerFailedError):
    """A rank raised an exception while running ``setup`` or ``__call__``.

    Attributes:
        rank: the rank that raised.
        exc_type: qualified name of the exception class on the worker, e.g. ``"ValueError"``.
        message: ``str()`` of the remote exception.
        remote_traceback: the traceback formatted on the worker.
    """

    def __init__(self, rank: int, exc_type: str, message: str, remote_traceback: str) -> None:
        self.rank = rank
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(
            f"rank {rank} raised {exc_type}: {message}\n\n"
            f"--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}"
        )

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.rank, self.exc_type, self.message, self.remote_traceback))


class WorkerDiedError(WorkerFailedError):
    """A rank process exited while the pool needed it, or its host was lost.

    Attributes:
        rank: the rank whose process exited.
        exitcode: the process exit status, or ``None`` if it was killed by a signal.
        signal: the signal number that killed it, or ``None``.
    """

    def __init__(self, rank: int, exitcode: int | None, signal_number: int | None, detail: str = "") -> None:
        self.rank = rank
        self.exitcode = exitcode
        self.signal = signal_number
        self.detail = detail
        if signal_number is not None:
            try:
                how = f"was killed by {signal.Signals(signal_number).name}"
            except ValueError:
                how = f"was killed by signal {signal_number}"
        elif exitcode is None:
            how = "was lost"  # no exit status to tell: its host is gone
        else:
            how = f"exited with code {exitcode}"
        text = f"rank {rank} {how}"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.rank, self.exitcode, self.signal, self.detail))


class PoolClosedError(RuntimeError):
    """The pool is not running: call ``start()`` first, or it was stopped."""


class ProtocolError(Exception):
    """A frame failed verification (bad signature, replay, or malformed). Never unpickled."""


class SignatureError(ProtocolError):
    """A frame not signed with the pool's key: its sender holds another key, or is no lightdist process."""


class PayloadError(TypeError):
    """A call's payload cannot be serialized for the workers (the message names the key)."""


class TextEventError(TypeError):
    """A streamed value cannot be encoded as a server-sent event."""


class ConfigError(ValueError):
    """A setting is wrong: a missing file or directory, a value out of range.

    Raised by recipes while they are built from a config, in the driver, before any worker starts.
    The message names the setting the way the CLI spells it (``data.train_file: no such file: ...``);
    the ``lightdist`` CLI prints it as one line and exits with status 2.
    """
