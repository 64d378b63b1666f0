"""Rank output that is not the rank's own: shown once and unprefixed, as one process would show it.

A rank's prints reach the driver prefixed with ``[rank N]``: every process prints, as with DDP, and
the prefix says which one did. Two kinds of output are different, because in-process Lightning runs
in one process and shows them once, as they are:

* **library output** — what Lightning itself writes (the model summary, "`Trainer.fit` stopped",
  its log lines and tips). Lightning already writes most of it from rank 0 only; the prefix would
  only make it look unlike Lightning's.
* **warnings** — every rank may raise the same one (a deprecation, a data-loader hint). One copy.

A rank marks them in its output as *records*: one line of ``RECORD_MARK`` + kind + the text as a
JSON string (so a record is one line, whatever it holds). :class:`RankStream`, the rank's
``sys.stdout``/``sys.stderr`` during a Trainer call, decides which writes are library output by
the module that wrote them. The template (:mod:`lightdist._template`) turns each record back into
its text with :func:`split_record`, lets :class:`WarningCopies` drop a warning another rank showed
already, and writes the text without a prefix. Plain output never contains ``RECORD_MARK`` (an
ASCII control character), and a line that does but does not parse is passed on as plain text.

Standard library only: the template imports this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections import OrderedDict
from types import FrameType
from typing import Any, TextIO

__all__ = [
    "LIBRARY",
    "RECORD_MARK",
    "WARNING",
    "RankStream",
    "WarningCopies",
    "encode_record",
    "split_record",
]

RECORD_MARK = "\x1e"  # ASCII record separator
LIBRARY = "L"  # written as is, unprefixed
WARNING = "W"  # written as is, unprefixed, once across ranks (see WarningCopies)
_KINDS = (LIBRARY, WARNING)
# A record stays well under the template's longest line (1 MiB, cut beyond): longer texts are sent
# as several records, which the template writes one after the other, so the output is the same.
_RECORD_CHARS = 1 << 16

# Whose writes are library output: Lightning's packages, and the Lightning layer of lightdist (its
# messages in the ranks mirror Lightning's own, e.g. "Initializing distributed").
LIBRARY_MODULES = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "lightning_utilities",
    "lightdist.lightning",
    "lightdist.pytorch_lightning",
)
# Modules that only carry text to the stream: the writer is whoever called them.
_CARRIERS = ("logging", "warnings", "rich", "lightdist._output")
_MAX_FRAMES = 64


def encode_record(kind: str, text: str) -> str:
    """``text`` as record lines of ``kind`` (one per ``_RECORD_CHARS`` characters)."""
    return "".join(
        f"{RECORD_MARK}{kind}{json.dumps(text[i : i + _RECORD_CHARS])}\n" for i in range(0, len(text), _RECORD_CHARS)
    )


def split_record(line: bytes) -> tuple[bytes, tuple[str, str] | None]:
    """A line of rank output (without its newline) as (plain text before a record, (kind, text) of
    the record or None). Plain text can precede a record when a print left its line unfinished."""
    at = line.find(RECORD_MARK.encode())
    if at < 0:
        return line, None
    body = line[at + 1 :]
    kind = body[:1].decode("ascii", "replace")
    try:
        text = json.loads(body[1:])
    except ValueError:
        return line, None
    if kind not in _KINDS or not isinstance(text, str):
        return line, None
    return line[:at], (kind, text)


class WarningCopies:
    """Which copies of a warning to show: the n-th copy when the first rank reaches its n-th.

    Identical warnings of several ranks show once, as in one process; a warning that a rank raises
    again (Python's "always" filter, or the rank's once-per-location registry reset) shows again, as
    it would in one process. Keyed by process, so a respawned rank's first copy counts as a first.
    Bounded: the least recently seen warnings are forgotten beyond ``limit``.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._shown: OrderedDict[bytes, int] = OrderedDict()  # warning -> copies shown
        self._seen: OrderedDict[tuple[int, bytes], int] = OrderedDict()  # (pid, warning) -> copies raised

    def admit(self, pid: int, text: str) -> bool:
        key = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        copies = self._seen.pop((pid, key), 0) + 1
        self._seen[(pid, key)] = copies
        shown = self._shown.pop(key, 0)
        self._shown[key] = max(shown, copies)
        for table in (self._seen, self._shown):
            while len(table) > self.limit:
                table.popitem(last=False)
        return copies > shown


class RankStream(io.TextIOBase):
    """A rank's ``sys.stdout`` or ``sys.stderr`` during a call: plain writes pass through (the
    template prefixes them); writes made by ``LIBRARY_MODULES`` become library records.

    ``isatty`` answers for the driver's terminal: the driver shows this output, so libraries that
    colour their output when writing to a terminal (rich's model summary) do so as they would
    in-process.
    """

    def __init__(self, raw: TextIO, isatty: bool = False) -> None:
        super().__init__()
        self.raw = raw
        self._isatty = isatty

    def write(self, text: str) -> int:
        if text and _written_by_library(sys._getframe(1)):
            self.write_record(LIBRARY, text)
        else:
            self.raw.write(text)
        return len(text)

    def write_record(self, kind: str, text: str) -> None:
        if text:
            self.raw.write(encode_record(kind, text))
            self.raw.flush()

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return self._isatty

    def fileno(self) -> int:
        return self.raw.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.raw.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.raw.errors

    def __getattr__(self, name: str) -> Any:
        # The rest of the real stream (``buffer``: binary writes pass as plain output, ``name``, ...).
        return getattr(self.raw, name)


def _written_by_library(frame: FrameType | None) -> bool:
    """Whether the first frame outside the text carriers (logging, rich, ...) is library code."""
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return False
        name = frame.f_globals.get("__name__") or ""
        if not _in(name, _CARRIERS):
            return _in(name, LIBRARY_MODULES)
        frame = frame.f_back
    return False


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)
