"""A real terminal for tests of what a command draws: a pty, and a model of the screen.

:func:`run_in_terminal` runs a command with a pty as its stdin, stdout and stderr (so tqdm and rich
see a terminal, as in a user's shell) and returns everything it wrote. :class:`Screen` interprets
that output as a VT100-style terminal does (the subset tqdm and rich use: ``\\r``, ``\\n``,
``\\b``, cursor moves ``ESC[nA/B/C/D/G/H``, erases ``ESC[K``/``ESC[J``, auto-wrap at the last
column, scrolling into a scrollback), so a test reads the lines a user would see at the end, or
at any moment on the way (:meth:`Screen.frames`).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["Screen", "run_in_terminal"]

_CSI = re.compile(r"\x1b\[([?>=]?)([0-9;]*)([@-~])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(\x07|\x1b\\)")


def run_in_terminal(
    argv: Sequence[str | Path],
    *,
    cwd: Path,
    env: dict[str, str],
    columns: int = 120,
    rows: int = 40,
    timeout: float = 60.0,
) -> tuple[int, str]:
    """``(exit status, everything the command wrote)``, the command run in a ``columns`` x ``rows``
    pty. Kills it (status -9) when it runs past ``timeout`` seconds."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(
        [str(arg) for arg in argv],
        cwd=cwd,
        env={**env, "TERM": "xterm", "COLUMNS": str(columns), "LINES": str(rows)},
        stdin=child,
        stdout=child,
        stderr=child,
        start_new_session=True,  # the pty is its controlling terminal, as in a shell
    )
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: every writer of the pty has closed it
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        status = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        status = -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(main)
    return status, b"".join(chunks).decode(errors="replace")


class Screen:
    """A terminal's screen: feed it output, read the lines it shows (scrollback included)."""

    def __init__(self, columns: int = 120, rows: int = 40) -> None:
        self.columns, self.rows = columns, rows
        self.scrollback: list[list[str]] = []
        self.lines: list[list[str]] = [[] for _ in range(rows)]
        self.row = self.col = 0
        self.wrap_pending = False  # at the last column: the next character goes to a new line

    @classmethod
    def of(cls, output: str, columns: int = 120, rows: int = 40) -> list[str]:
        """The lines shown once all of ``output`` is drawn."""
        screen = cls(columns, rows)
        screen.feed(output)
        return screen.text()

    @classmethod
    def frames(cls, output: str, columns: int = 120, rows: int = 40) -> Iterator[list[str]]:
        """The visible lines after each redraw (each ``\\r``): what the screen showed on the way."""
        screen = cls(columns, rows)
        for piece in re.split(r"(?=\r)", output):
            screen.feed(piece)
            yield screen.visible()

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            char = text[i]
            if char == "\x1b":
                csi = _CSI.match(text, i)
                osc = _OSC.match(text, i)
                if csi:
                    self._csi(csi.group(1), csi.group(2), csi.group(3))
                    i = csi.end()
                elif osc:
                    i = osc.end()  # a window title: nothing on the screen
                else:
                    i += 2  # a two-character escape (keypad mode, charset): nothing drawn
                continue
            i += 1
            if char == "\r":
                self.col, self.wrap_pending = 0, False
            elif char == "\n":
                self._line_feed()
            elif char == "\b":
                self.col, self.wrap_pending = max(0, self.col - 1), False
            elif char >= " " and char != "\x7f":
                self._put(char)

    def visible(self) -> list[str]:
        return ["".join(line).rstrip() for line in self.lines]

    def text(self) -> list[str]:
        lines = ["".join(line).rstrip() for line in self.scrollback + self.lines]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def _put(self, char: str) -> None:
        if self.wrap_pending:
            self.col = 0
            self._line_feed()
        line = self.lines[self.row]
        line.extend(" " * (self.col + 1 - len(line)))
        line[self.col] = char
        if self.col == self.columns - 1:
            self.wrap_pending = True
        else:
            self.col += 1

    def _line_feed(self) -> None:
        self.wrap_pending = False
        if self.row == self.rows - 1:
            self.scrollback.append(self.lines.pop(0))
            self.lines.append([])
        else:
            self.row += 1

    def _csi(self, private: str, params: str, final: str) -> None:
        if private:
            return  # a mode (cursor shown or hidden, ...): nothing drawn
        args = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = args[0] if args and args[0] else 1
        self.wrap_pending = False
        line = self.lines[self.row]
        if final == "A":
            self.row = max(0, self.row - n)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif final == "C":
            self.col = min(self.columns - 1, self.col + n)
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "G":
            self.col = min(self.columns - 1, n - 1)
        elif final in "Hf":
            self.row = min(self.rows - 1, n - 1)
            self.col = min(self.columns - 1, (args[1] if len(args) > 1 and args[1] else 1) - 1)
        elif final == "K":
            mode = args[0] if args else 0
            if mode == 0:
                del line[self.col :]
            elif mode == 1:
                line[: self.col + 1] = [" "] * min(len(line), self.col + 1)
            else:
                line.clear()
        elif final == "J":
            mode = args[0] if args else 0
            if mode == 0:
                del line[self.col :]
                for row in range(self.row + 1, self.rows):
                    self.lines[row] = []
            elif mode == 2:
                self.lines = [[] for _ in range(self.rows)]
