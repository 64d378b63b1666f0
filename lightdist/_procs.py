"""Driver-side handle on the template process and the ranks it forks.

Two daemon threads per pool: the *monitor* reads the template's control pipe (rank spawned / exited,
reported the moment ``waitpid`` returns) and the *output* thread copies the ranks' prefixed output to
the driver's ``sys.stdout``/``sys.stderr`` (so notebooks and pytest capture see it). The template's
stdin is the death pipe: when the driver dies, the kernel closes it and the template kills the ranks.
"""

from __future__ import annotations

import codecs
import json
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lightdist._messages import RankBoot, driver_sys_path
from lightdist._progress import write_around_bars

__all__ = ["RankExit", "RankHost", "TemplateProcess"]

_LEN = struct.Struct("!I")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TEMPLATE_BOOT = "import sys; sys.path.insert(0, {root!r}); from lightdist._template import main; main()"
# How long stop() waits for the output thread after the template exited: it finishes at once unless
# the driver's own stdout blocks (nobody reads it), and then stop() must not wait on it.
_OUTPUT_JOIN_S = 1.0


@dataclass(frozen=True)
class RankExit:
    rank: int
    pid: int
    sender: str  # which life of the rank: a respawned rank has a new sender name
    exitcode: int | None
    signal: int | None
    detail: str = ""  # why, when the driver knows more than the exit status (a lost host)


class RankHost(Protocol):
    """Where ranks run: this machine's template process, or a remote host's agent
    (:class:`lightdist._agent_host.AgentHost`). The pool only ever talks to ranks' processes through this."""

    name: str
    pids: dict[int, int]  # rank -> pid of its live process on this host

    def spawn(self, rank: int, boot: RankBoot) -> None: ...
    def signal_ranks(self, sig: int, ranks: list[int] | None = None) -> None: ...
    def wait_ranks_gone(self, timeout: float) -> bool: ...
    def close(self, grace: float = 2.0) -> None: ...


class TemplateProcess:
    """Starts the template process (:mod:`lightdist._template`) and forks ranks through it."""

    def __init__(
        self,
        imports: list[str],
        cwd: str | None,
        on_exit: Callable[[RankExit], None],
        on_template_lost: Callable[[str], None],
        cleanup_dir: str | None = None,
        on_spawned: Callable[[int, int, str], None] | None = None,
        host: str = "",
        output: Callable[[str, str], None] | None = None,
    ) -> None:
        """``host``: an agent's host name, put in its ranks' output prefix (``[host rank N]``).
        ``output(stream, text)``: where the ranks' output goes ("stdout"/"stderr", whole characters),
        from the output thread; it may block, which the template bounds (see ``_template._Output``).
        Default: this process's ``sys.stdout``/``sys.stderr``."""
        self.name = "local"  # the host, in messages; a remote host's agent names it
        self._write_output = output or _write_to_sys
        self._on_exit = on_exit
        self._on_spawned = on_spawned
        self._on_template_lost = on_template_lost
        self._lock = threading.Lock()
        self.pids: dict[int, int] = {}  # rank -> pid of the live process
        self.senders: dict[int, str] = {}  # rank -> sender name of that process
        self._spawned = threading.Condition(self._lock)
        self.error: str | None = None
        self._closing = False
        control_r, control_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                # Not `-m lightdist._template`: lightdist must import even when it is not installed
                # and `cwd` is elsewhere, so the package's own parent directory goes on the path.
                [sys.executable, "-u", "-c", _TEMPLATE_BOOT.format(root=_PACKAGE_ROOT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(control_w,),
                cwd=cwd,
                # Own session: a Ctrl-C in the terminal reaches the driver only, which cancels calls
                # on every rank together instead of killing some ranks mid-collective.
                start_new_session=True,
            )
        finally:
            os.close(control_w)
        self._control = os.fdopen(control_r, "rb")
        self._send(
            {
                "control_fd": control_w,
                "imports": imports,
                "sys_path": driver_sys_path(),
                "cleanup_dir": cleanup_dir,
                "host": host,
            }
        )
        self._monitor = threading.Thread(target=self._watch, name="lightdist-monitor", daemon=True)
        self._output = threading.Thread(target=self._forward_output, name="lightdist-output", daemon=True)
        self._monitor.start()
        self._output.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, command: dict[str, Any]) -> None:
        data = pickle.dumps(command, protocol=5)
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(_LEN.pack(len(data)) + data)
            self.proc.stdin.flush()

    def spawn(self, rank: int, boot: RankBoot) -> None:
        """Ask the template to fork ``rank``; returns at once (READY comes over ZMQ)."""
        self._send({"op": "spawn", "rank": rank, "boot": boot})

    def signal_ranks(self, sig: int, ranks: list[int] | None = None) -> None:
        with self._lock:
            targets = [pid for r, pid in self.pids.items() if ranks is None or r in ranks]
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait_ranks_gone(self, timeout: float) -> bool:
        with self._spawned:
            return self._spawned.wait_for(lambda: not self.pids, max(0.0, timeout))

    def close(self, grace: float = 2.0) -> None:
        """Close the death pipe (the template kills what is left) and reap the template."""
        self._closing = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._monitor.join(timeout=5)
        # The output thread closes the template's output pipes itself, when it is done with them: it
        # may still be blocked writing to a sys.stdout nobody reads, and must not be left reading
        # descriptors closed (or reused) under it.
        self._output.join(timeout=_OUTPUT_JOIN_S)
        self._control.close()

    # --- threads ---------------------------------------------------------------------------------
    def _watch(self) -> None:
        for line in self._control:
            event = json.loads(line)
            kind = event["ev"]
            if kind == "spawned":
                with self._spawned:
                    self.pids[event["rank"]] = event["pid"]
                    self.senders[event["rank"]] = event["sender"]
                    self._spawned.notify_all()
                if self._on_spawned is not None:
                    self._on_spawned(event["rank"], event["pid"], event["sender"])
            elif kind == "exit":
                with self._spawned:
                    if self.pids.get(event["rank"]) == event["pid"]:
                        del self.pids[event["rank"]]
                    self._spawned.notify_all()
                self._on_exit(RankExit(event["rank"], event["pid"], event["sender"], event["code"], event["signal"]))
            elif kind == "error":
                self.error = event["traceback"]
        # EOF: the template exited. Its ranks die with it (PDEATHSIG). Report the template first:
        # the pool must not try to respawn the ranks through it (deadlocks if re-ordered).
        code = self.proc.wait()
        if not self._closing:
            self._on_template_lost(self.error or f"the template process exited with code {code}")
        with self._spawned:
            lost = dict(self.pids)
            self.pids.clear()
            self._spawned.notify_all()
        for rank, pid in lost.items():
            self._on_exit(RankExit(rank, pid, self.senders.get(rank, ""), None, signal.SIGKILL))

    def _forward_output(self) -> None:
        # Takes no lock of the pool's: sys.stdout may block (a pipe nobody reads) for as long as
        # it likes; the template then holds, and beyond a bound drops, the ranks' output.
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = [self.proc.stdout, self.proc.stderr]
        targets = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        # One incremental decoder per stream: a character split across two reads is decoded
        # whole (decoding each read alone turns its halves into replacement characters).
        decoders = {fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in targets}
        sel = selectors.DefaultSelector()
        for fd in targets:
            sel.register(fd, selectors.EVENT_READ)
        try:
            while targets:
                for key, _ in sel.select():
                    fd = int(key.fd)
                    data = os.read(fd, 1 << 16)
                    text = decoders[fd].decode(data, final=not data)
                    if text:
                        self._write_output(targets[fd], text)
                    if not data:
                        sel.unregister(fd)
                        del targets[fd]
        finally:
            sel.close()
            for stream in streams:
                stream.close()


def _write_to_sys(stream: str, text: str) -> None:
    write_text(getattr(sys, stream), text)


def write_text(out: Any, text: str) -> None:
    """Write and flush ``text`` to one of the driver's streams: around a progress bar the driver
    draws, so that no line is glued to the bar's; a closed stream is ignored (it must not stop us
    draining the pipe)."""
    write_around_bars(out, text)
