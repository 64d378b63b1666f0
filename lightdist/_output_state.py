"""The driver's output settings, applied in the ranks for each call: the output the script controls.

In-process, ``warnings.filterwarnings(...)`` and ``logging.getLogger("lightning.pytorch").setLevel(...)``
in a script decide what a fit prints. The ranks are other processes, started before the script set
anything, so the launcher captures these settings with every call (:func:`capture`) and the rank
runs the call inside :func:`applied`:

- **warning filters**: ``warnings.filters``, the entries that pickle, with their regexes;
- **loggers**: level, ``disabled``, ``propagate`` and console handlers (a ``StreamHandler`` to
  stdout or stderr, with its level and formatter) of Lightning's loggers, the root logger and every
  logger the script configured (a level, a handler, ``disabled``, ``propagate=False``), and
  ``logging.disable()``. Handlers to files, sockets, ... are not reproduced: the ranks' records
  reach the driver's terminal, not the driver's files;
- **the terminal**: whether the driver's stdout/stderr are terminals, and its width, so that rich
  colours and sizes the model summary as it does in-process.

Inside :func:`applied` the rank's ``sys.stdout``/``sys.stderr`` are
:class:`~lightdist._output.RankStream` (Lightning's lines unprefixed) and warnings are shown as
warning records (one copy across ranks): see :mod:`lightdist._output`.

Afterwards the rank's own loggers, streams and environment are restored. The warning filters are
not put back but replaced whole by the next call's, and only when they differ: any change of the
filters also resets Python's once-per-location registry of warnings already shown, and a warm rank
would then repeat every warning on every call, where one process shows it once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from lightdist import protocol
from lightdist._output import WARNING, RankStream

__all__ = ["LIGHTNING_LOGGERS", "ConsoleHandler", "LoggerState", "OutputState", "applied", "capture"]

# Shipped whatever their state: the loggers of Lightning's output (unified and standalone packages).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# Rebuilt for every call, even when equal: Lightning's records pass through their handlers, which
# must write to RankStream (that is how Lightning's lines are told from the rank's own prints).
_ALWAYS_REBUILT = ("", *LIGHTNING_LOGGERS)
_ACTIONS = ("default", "error", "ignore", "always", "module", "once")

# (action, message regex, category, module regex, lineno): warnings.filterwarnings' arguments.
FilterEntry = tuple[str, str, type[Warning], str, int]

# Filter entries and formatters travel as pickles of their own, made once per object: one that does
# not pickle stays behind, and one the rank cannot load (its class's module is not importable
# there) is skipped there, instead of failing the whole call. Weak keys: these objects live as
# long as the driver's filters and loggers (torch alone configures ~40 loggers with its formatter).
_pickled: weakref.WeakKeyDictionary[Any, bytes | None] = weakref.WeakKeyDictionary()


# Each filter entry's pickle, made once (the same filters go with every call).
_entry_pickles: dict[FilterEntry, bytes] = {}


@dataclass(frozen=True)
class ConsoleHandler:
    """A ``logging.StreamHandler`` writing to stdout or stderr."""

    stream: str  # "stdout" or "stderr"
    level: int
    formatter: bytes | None  # pickled; None: logging's default format


@dataclass(frozen=True)
class LoggerState:
    name: str  # "" is the root logger
    level: int
    disabled: bool
    propagate: bool
    handlers: tuple[ConsoleHandler, ...]


@dataclass(frozen=True)
class OutputState:
    filters: tuple[bytes, ...]  # pickled FilterEntry each, in the driver's order
    loggers: tuple[LoggerState, ...]
    disable: int  # logging.disable()'s level
    isatty: tuple[bool, bool]  # the driver's stdout, stderr
    columns: int | None  # the driver's terminal width, when it has one


def capture() -> OutputState:
    """The driver's settings now (called by the launcher for each call)."""
    isatty = (_isatty(sys.stdout), _isatty(sys.stderr))
    return OutputState(
        filters=_sent_filters(),
        loggers=tuple(_logger_state(name, logger) for name, logger in _configured_loggers()),
        disable=logging.root.manager.disable,
        isatty=isatty,
        columns=(shutil.get_terminal_size((0, 0)).columns or None) if any(isatty) else None,
    )


@contextlib.contextmanager
def applied(state: OutputState | None) -> Iterator[None]:
    """Run the block (a call, in a rank) with the driver's ``state``; restore the rank's own after."""
    if state is None:  # a caller that sends none (an older client): the rank's settings as they are
        yield
        return
    _apply_filters(state.filters)
    streams = {
        name: RankStream(_unwrapped(getattr(sys, name)), isatty)
        for name, isatty in zip(("stdout", "stderr"), state.isatty)
    }
    saved_streams = (sys.stdout, sys.stderr)
    saved_show = warnings.showwarning
    saved_disable = logging.root.manager.disable
    saved_columns = os.environ.get("COLUMNS")
    restores: list[Callable[[], None]] = []
    try:
        for logger_state in state.loggers:
            if (restore := _apply_logger(logger_state, streams)) is not None:
                restores.append(restore)
        sys.stdout, sys.stderr = streams["stdout"], streams["stderr"]
        warnings.showwarning = functools.partial(_show_warning, streams["stderr"])
        if state.disable != saved_disable:
            logging.disable(state.disable)
        if state.columns:
            os.environ["COLUMNS"] = str(state.columns)
        yield
    finally:
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
        if logging.root.manager.disable != saved_disable:
            logging.disable(saved_disable)
        warnings.showwarning = saved_show
        sys.stdout, sys.stderr = saved_streams
        for restore in reversed(restores):
            restore()
        for stream in streams.values():
            stream.flush()


# --- driver side ---------------------------------------------------------------------------------


def _filter_entries(filters: Sequence[Any]) -> tuple[FilterEntry, ...]:
    """``filters`` as filterwarnings' arguments: valid entries, first of duplicates only (a later
    duplicate never matches)."""
    entries: list[FilterEntry] = []
    for item in filters:
        try:
            action, message, category, module, lineno = item
        except (TypeError, ValueError):
            continue
        entry = (action, _pattern(message), category, _pattern(module), lineno)
        if entry not in entries and _valid(entry):
            entries.append(entry)
    return tuple(entries)


def _sent_filters() -> tuple[bytes, ...]:
    pickles = []
    for entry in _filter_entries(warnings.filters):
        data = _entry_pickles.get(entry)
        if data is None:
            category = entry[2]
            if category.__module__ != "builtins" and _pickle(category) is None:
                continue  # the entry is plain data around its category: that decides
            data = protocol.dumps(entry)
            if len(_entry_pickles) >= 1024:  # bounded: a script adding filters in a loop
                _entry_pickles.clear()
            _entry_pickles[entry] = data
        pickles.append(data)
    return tuple(pickles)


def _pattern(regex: Any) -> Any:
    if regex is None:
        return ""
    return regex.pattern if isinstance(regex, re.Pattern) else regex


def _valid(entry: tuple[Any, ...]) -> bool:
    action, message, category, module, lineno = entry
    return (
        action in _ACTIONS
        and isinstance(message, str)
        and isinstance(category, type)
        and issubclass(category, Warning)
        and isinstance(module, str)
        and isinstance(lineno, int)
        and lineno >= 0
    )


def _pickle(obj: Any) -> bytes | None:
    """``obj`` pickled, or None when it cannot be; remembered per object while it lives."""
    try:
        return _pickled[obj]
    except (KeyError, TypeError):
        pass
    try:
        data: bytes | None = protocol.dumps(obj)
    except Exception:  # noqa: BLE001 - whatever stops it travelling, it stays behind
        data = None
    with contextlib.suppress(TypeError):  # not weakly referenceable: pickled again next time
        _pickled[obj] = data
    return data


def _unpickle(data: bytes) -> Any:
    """What the driver pickled, or None when this process cannot load it."""
    try:
        return protocol.loads(data)
    except Exception:  # noqa: BLE001 - e.g. a class whose module only the driver can import
        return None


def _configured_loggers() -> list[tuple[str, logging.Logger]]:
    """Root, Lightning's loggers, and every logger with a level, a handler, ``disabled`` or
    ``propagate=False`` (loggers never configured follow their parents; nothing to send)."""
    found: list[tuple[str, logging.Logger]] = [("", logging.root)]
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue  # a placeholder: a parent name of some logger, never used itself
        configured = logger.level != logging.NOTSET or logger.disabled or not logger.propagate or logger.handlers
        if configured or name in LIGHTNING_LOGGERS:
            found.append((name, logger))
    return found


def _logger_state(name: str, logger: logging.Logger) -> LoggerState:
    handlers = []
    for handler in logger.handlers:
        stream = _console_stream(handler, name)
        if stream is not None:
            formatter = None if handler.formatter is None else _pickle(handler.formatter)
            handlers.append(ConsoleHandler(stream, handler.level, formatter))
    return LoggerState(name, logger.level, logger.disabled, logger.propagate, tuple(handlers))


def _console_stream(handler: logging.Handler, logger_name: str) -> str | None:
    """ "stdout" or "stderr" for a StreamHandler writing to one of them, else None: files, sockets
    and streams of this process only (a StringIO collecting records, pytest's log capture) are not
    reproduced in the ranks, whose records cannot reach them.

    Lightning's own handlers count as stderr wherever they write: a plain StreamHandler made when
    Lightning was imported, on the stderr of that moment, which a harness may have replaced by its
    capture of the terminal (pytest does); the ranks' lines belong there too."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return None
    stream = handler.stream
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if stream is getattr(sys, name) or stream is getattr(sys, f"__{name}__") or _fileno(stream) == fd:
            return name
    return "stderr" if type(handler) is logging.StreamHandler and logger_name in LIGHTNING_LOGGERS else None


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


# --- rank side -----------------------------------------------------------------------------------


def _apply_filters(pickles: tuple[bytes, ...]) -> None:
    entries = tuple(entry for data in pickles if (entry := _unpickle(data)) is not None)
    if _filter_entries(warnings.filters) == entries:
        return  # unchanged: keep the registry of warnings shown once (see the module docstring)
    warnings.resetwarnings()
    for action, message, category, module, lineno in entries:
        warnings.filterwarnings(action, message, category, module, lineno, append=True)


def _apply_logger(state: LoggerState, streams: dict[str, RankStream]) -> Callable[[], None] | None:
    """Give the rank's logger the driver's state; returns the function that restores the rank's
    (None when the logger was left as it was)."""
    logger = logging.getLogger(state.name) if state.name else logging.root
    if state.name not in _ALWAYS_REBUILT and _same(logger, state):
        # The same imports configured it in both processes (torch configures dozens): nothing to do.
        # Its console handlers stay on the raw streams, so its records show prefixed (not Lightning's).
        return None
    saved = (logger.level, logger.disabled, logger.propagate, list(logger.handlers))
    if logger.level != state.level:  # setLevel clears every logger's isEnabledFor cache: not for nothing
        logger.setLevel(state.level)
    logger.disabled = state.disabled
    logger.propagate = state.propagate
    # The rank's own console handlers write to its raw streams, past RankStream: the driver's,
    # rebuilt on RankStream, take their place for the call. Other handlers stay.
    kept = [h for h in logger.handlers if _console_stream(h, state.name) is None]
    logger.handlers = [*kept, *(_console_handler(spec, streams) for spec in state.handlers)]

    def restore() -> None:
        if logger.level != saved[0]:
            logger.setLevel(saved[0])
        logger.disabled, logger.propagate, logger.handlers = saved[1], saved[2], saved[3]

    return restore


def _same(logger: logging.Logger, state: LoggerState) -> bool:
    consoles = [(stream, h.level) for h in logger.handlers if (stream := _console_stream(h, state.name)) is not None]
    return (logger.level, logger.disabled, logger.propagate) == (state.level, state.disabled, state.propagate) and (
        consoles == [(h.stream, h.level) for h in state.handlers]
    )


def _console_handler(spec: ConsoleHandler, streams: dict[str, RankStream]) -> logging.Handler:
    handler = logging.StreamHandler(streams[spec.stream])
    handler.setLevel(spec.level)
    formatter = None if spec.formatter is None else _unpickle(spec.formatter)
    if isinstance(formatter, logging.Formatter):
        handler.setFormatter(formatter)
    return handler


def _unwrapped(stream: TextIO) -> TextIO:
    return stream.raw if isinstance(stream, RankStream) else stream


def _show_warning(
    stream: RankStream,
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` during a call: a warning record (one copy across ranks), formatted
    by ``warnings.formatwarning`` as usual (Lightning installs its own format for its warnings)."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    if file is None or file is stream or file is sys.stderr:
        stream.write_record(WARNING, text)
        return
    try:
        file.write(text)
    except (OSError, ValueError):
        pass  # as warnings' own showwarning: a stream that cannot take it loses the warning
