"""The template process: imports torch once, then forks every rank from that warm state.

Started by the driver as ``python -u -c "...; lightdist._template.main()"``. Importing torch (and lightning) costs
seconds of CPU; paying it once and forking ranks keeps pool start flat in ``world_size``. Forking is
safe because this process stays single-threaded and never touches CUDA or user code: the worker class
arrives as bytes and is only unpickled inside a rank, after the fork.

Channels with the driver (all private pipes, so they carry trusted data):

* stdin: length-prefixed pickled commands (``init``, ``spawn``). EOF means the driver is gone: every
  rank is killed and this process exits. This is the death pipe.
* control fd (passed by the driver): JSON lines of events (``spawned``, ``exit``, ``error``).
* stdout/stderr: each rank's output, line by line, prefixed with ``[rank N]`` (``[host rank N]`` in
  an agent's template), except the records a rank marks as library output or warnings
  (:mod:`lightdist._output`): their text goes unprefixed, and a warning only once however many
  ranks raise it. Written without blocking (:class:`_Output`): this loop also reaps and respawns
  ranks, which a driver that stopped reading its stdout must not hold up.

One ``select`` loop serves all of it; a one-second tick checks that the driver is still our parent.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import struct
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from lightdist._output import WARNING, WarningCopies, split_record

if TYPE_CHECKING:
    from collections.abc import Container

    from lightdist._messages import RankBoot

_LEN = struct.Struct("!I")
_MAX_PARTIAL_LINE = 1 << 20  # a longer line is passed on in pieces (each cut between characters)
_OUTPUT_BUFFER = 1 << 20  # rank output waiting per stream for the driver to read it
_STALL_S = 1.0  # a driver that took no output for this long is not reading it: drop, do not wait
_FINAL_FLUSH_S = 1.0  # how long output still waiting may hold up our exit


class _Output:
    """One of our output streams (stdout or stderr), written without ever blocking.

    While the driver reads, however slowly, nothing is lost: once ``_OUTPUT_BUFFER`` bytes wait,
    the loop stops reading the ranks' pipes for this stream (:meth:`taking`), so their prints wait,
    as they would on any pipe. A driver that took nothing for ``_STALL_S`` is not reading (a
    stdout nobody drains): then the ranks' output is read and dropped, counted, until the backlog
    has drained, so the gap is one stretch, marked by one notice line saying how much was lost.
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.pending = bytearray()
        self.progress = time.monotonic()  # when the driver last took output (or a backlog began)
        self.dropped = 0  # bytes dropped since the backlog last drained
        self.closed = False  # the driver closed its end: nothing will be read again
        os.set_blocking(fd, False)

    def stalled_at(self) -> float:
        """When a full backlog that the driver does not take counts as not being read."""
        return self.progress + _STALL_S

    def taking(self, now: float) -> bool:
        """Whether to read more of the ranks' output for this stream now."""
        return len(self.pending) < _OUTPUT_BUFFER or bool(self.dropped) or now >= self.stalled_at()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        now = time.monotonic()
        if self.dropped or (len(self.pending) >= _OUTPUT_BUFFER and now >= self.stalled_at()):
            self.dropped += len(data)
            return
        if not self.pending:
            self.progress = now
        self.pending += data  # past the bound by one chunk at most, or what a dead rank left (reap)
        self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now; the loop calls again when it becomes writable."""
        while self.pending and not self.closed:
            try:
                written = os.write(self.fd, self.pending)
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the driver is gone; output is best effort, control is not
                self.closed = True
                self.pending.clear()
                return
            del self.pending[:written]
            self.progress = time.monotonic()
            if not self.pending and self.dropped:
                self.pending += (
                    f"[lightdist] dropped {self.dropped} bytes of rank output "
                    f"(the driver's {self.name} was not being read)\n"
                ).encode()
                self.dropped = 0


class _Rank:
    def __init__(self, rank: int, sender: str, pid: int, pidfd: int, out_fd: int, err_fd: int, host: str) -> None:
        self.rank = rank
        self.sender = sender
        self.pid = pid
        self.pidfd = pidfd
        self.partial = {out_fd: b"", err_fd: b""}
        self.target = {out_fd: 1, err_fd: 2}
        # An agent's ranks name their host: their lines reach the driver next to other hosts'.
        self.prefix = (f"[{host} rank {rank}] " if host else f"[rank {rank}] ").encode()


class Template:
    def __init__(self, control_fd: int) -> None:
        self.control_fd = control_fd
        self.parent = os.getppid()
        self.ranks: dict[int, _Rank] = {}  # by pid
        self.cleanup_dir: str | None = None  # the pool's private ipc directory
        self.stdin_buf = b""
        self.outputs = {1: _Output(1, "stdout"), 2: _Output(2, "stderr")}
        self.host = ""  # an agent's host name, in the ranks' output prefix
        self.warnings = WarningCopies()  # identical warnings of several ranks show once

    # --- driver channels -------------------------------------------------------------------------
    def emit(self, **event: Any) -> None:
        os.write(self.control_fd, json.dumps(event).encode() + b"\n")

    def read_commands(self) -> list[dict[str, Any]] | None:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return None  # EOF: the driver closed the pipe or died
        self.stdin_buf += chunk
        commands = []
        while len(self.stdin_buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self.stdin_buf)
            if len(self.stdin_buf) < _LEN.size + size:
                break
            commands.append(pickle.loads(self.stdin_buf[_LEN.size : _LEN.size + size]))
            self.stdin_buf = self.stdin_buf[_LEN.size + size :]
        return commands

    # --- ranks -----------------------------------------------------------------------------------
    def spawn(self, rank: int, boot: RankBoot) -> None:
        # One process per rank: an earlier life still running (a respawn during recovery) goes first.
        for old in [r for r in self.ranks.values() if r.rank == rank]:
            try:
                os.kill(old.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the rank
            try:
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                # Drop every fd of the template's: the driver's pipes must close when the template
                # exits, and another rank's output pipe must not stay open in this one.
                for fd in [devnull, out_r, out_w, err_r, err_w, self.control_fd, *self._fds()]:
                    _close(fd)
                from lightdist._rank import rank_main

                code = rank_main(boot, template_pid=os.getppid())
            except BaseException:  # noqa: BLE001 - a forked child must never return into the loop
                traceback.print_exc()
                code = 70
            _flush_and_exit(code)
        os.close(out_w)
        os.close(err_w)
        self.ranks[pid] = _Rank(rank, boot.sender, pid, os.pidfd_open(pid), out_r, err_r, self.host)
        self.emit(ev="spawned", rank=rank, pid=pid, sender=boot.sender)

    def _fds(self, held_targets: Container[int] = ()) -> list[int]:
        """Our fds for the ranks: pidfds and output pipes, but not those that feed ``held_targets``."""
        fds = []
        for r in self.ranks.values():
            fds += [r.pidfd, *(fd for fd in r.partial if r.target[fd] not in held_targets)]
        return fds

    def forward(self, rank: _Rank, fd: int) -> bool:
        """Copy what ``fd`` holds to our output, prefixed; False at EOF."""
        data = os.read(fd, 1 << 16)
        buf = rank.partial[fd] + data
        if not data:  # the rank closed it (exited): flush what is left
            if buf:
                self._write(rank.target[fd], self._line(rank, buf))
            rank.partial[fd] = b""
            return False
        *lines, rest = buf.split(b"\n")
        if len(rest) > _MAX_PARTIAL_LINE:
            cut = _whole_chars(rest)
            lines.append(rest[:cut])
            rest = rest[cut:]
        out = b"".join(self._line(rank, line) for line in lines)
        if b"\r" in rest:
            # A progress bar redraws its line with "\r" and no newline: pass each redraw on now,
            # prefixed and still ending in "\r", so a terminal or notebook redraws it in place.
            done, rest = rest.rsplit(b"\r", 1)
            out += rank.prefix + _prefix_redraws(done, rank.prefix) + b"\r"
        if out:
            self._write(rank.target[fd], out)
        rank.partial[fd] = rest
        return True

    def _line(self, rank: _Rank, line: bytes) -> bytes:
        """One whole line of a rank's output as we pass it on: prefixed, or a record's text as is
        (library output and warnings, see lightdist._output), or nothing (a warning another rank
        showed already)."""
        plain, record = split_record(line)
        if record is None:
            return rank.prefix + _prefix_redraws(plain.rstrip(b"\r"), rank.prefix) + b"\n"
        out = rank.prefix + plain + b"\n" if plain else b""  # an unfinished print before the record
        kind, text = record
        if kind != WARNING or self.warnings.admit(rank.pid, text):
            out += text.encode("utf-8", "surrogateescape")
        return out

    def _write(self, fd: int, data: bytes) -> None:
        self.outputs[fd].write(data)

    def flush_output(self, timeout: float) -> None:
        """Before exiting: give the driver up to ``timeout`` seconds to take what is still waiting."""
        deadline = time.monotonic() + timeout
        while waiting := [o.fd for o in self.outputs.values() if o.pending and not o.closed]:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd in select.select([], waiting, [], left)[1]:
                self.outputs[fd].flush()

    def reap(self, rank: _Rank) -> None:
        for fd in list(rank.partial):
            # Drain what the rank wrote before it died, but never block: a child of the rank (a
            # DataLoader worker, say) may still hold the pipe open.
            while select.select([fd], [], [], 0)[0] and self.forward(rank, fd):
                pass
            if rank.partial[fd]:
                self._write(rank.target[fd], self._line(rank, rank.partial[fd]))
            _close(fd)
        _, status = os.waitpid(rank.pid, 0)
        _close(rank.pidfd)
        del self.ranks[rank.pid]
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        self.emit(ev="exit", rank=rank.rank, pid=rank.pid, sender=rank.sender, code=code, signal=sig)

    def kill_all(self) -> None:
        for pid in list(self.ranks):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for rank in list(self.ranks.values()):
            try:
                self.reap(rank)
            except OSError:
                pass

    def driver_gone(self) -> None:
        """The driver died without stopping the pool: remove what it would have removed."""
        if self.cleanup_dir:
            import shutil

            shutil.rmtree(self.cleanup_dir, ignore_errors=True)

    # --- main loop -------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            now = time.monotonic()
            held = {o.fd for o in self.outputs.values() if not o.taking(now)}
            watched = [0, *self._fds(held_targets=held)]
            backlog = [o.fd for o in self.outputs.values() if o.pending and not o.closed]
            # Wake when a held stream's driver counts as not reading, to drop instead of hold.
            timeout = min([1.0, *(self.outputs[fd].stalled_at() - now for fd in held)])
            readable, writable, _ = select.select(watched, backlog, [], max(0.0, timeout))
            for fd in writable:
                self.outputs[fd].flush()
            if os.getppid() != self.parent:  # the driver died without closing the pipe
                self.driver_gone()
                break
            by_fd = {fd: r for r in self.ranks.values() for fd in [r.pidfd, *r.partial]}
            for fd in readable:
                if fd == 0:
                    commands = self.read_commands()
                    if commands is None:
                        self.kill_all()
                        if os.getppid() != self.parent:
                            self.driver_gone()
                        return
                    for cmd in commands:
                        if cmd["op"] == "spawn":
                            self.spawn(cmd["rank"], cmd["boot"])
                    continue
                rank = by_fd.get(fd)
                if rank is None or rank.pid not in self.ranks:
                    continue
                if fd == rank.pidfd:
                    self.reap(rank)
                else:
                    self.forward(rank, fd)
        self.kill_all()


def _whole_chars(data: bytes) -> int:
    """Where to cut ``data`` so that no UTF-8 character is split: its length, or the start of an
    incomplete character at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: whatever follows starts a new character
            return len(data)
        if byte >= 0xC0:  # the lead byte of the last character: is the character complete?
            size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= size else len(data) - back
    return len(data)  # not UTF-8 (or only continuation bytes): any cut will do


def _prefix_redraws(data: bytes, prefix: bytes) -> bytes:
    return data.replace(b"\r", b"\r" + prefix)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def main() -> None:
    # Output of the template itself goes to the driver unprefixed; the ranks' is prefixed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver owns Ctrl-C and sends CANCEL
    (size,) = _LEN.unpack(_read_exact(0, _LEN.size))
    init = pickle.loads(_read_exact(0, size))
    control_fd = init["control_fd"]
    template = Template(control_fd)
    template.cleanup_dir = init.get("cleanup_dir")
    template.host = init.get("host", "")
    try:
        os.environ.update(init.get("env", {}))
        from lightdist._messages import adopt_sys_path

        adopt_sys_path(init.get("sys_path", []))
        for module in init["imports"]:
            __import__(module)
        # Everything imported so far lives as long as the ranks do: freezing it keeps it out of
        # every later collection (a rank collects after each Trainer call), and the collector
        # never writes to those pages, so they stay shared with the ranks forked from here.
        import gc

        gc.freeze()
    except BaseException:  # noqa: BLE001
        template.emit(ev="error", traceback=traceback.format_exc())
        _flush_and_exit(1)
    template.serve()
    template.flush_output(_FINAL_FLUSH_S)
    # Every rank is reaped; skip interpreter shutdown, which with torch loaded takes ~0.5 s.
    _flush_and_exit(0)


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            sys.exit(0)  # the driver went away before sending the bootstrap
        buf += chunk
    return buf


if __name__ == "__main__":
    main()
