"""Run the real ``lightdist`` console script in a subprocess, and prove it left no process behind;
serve a log directory with ``lightdist tensorboard`` (:class:`Board`) and ask it over HTTP.

Workers that outlive the CLI would be re-parented to init and escape the autouse leak checker (it
looks at this process's descendants), so every run is tagged with an environment marker that forked
ranks inherit, and :func:`run_cli` fails if any process still carries the marker after the CLI has
exited.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import descendants, pid_alive
from tests.terminal import run_in_terminal

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightdist" / "recipes" / "configs"  # the shipped configs (configs/ links here)
LIGHTDIST = Path(sys.executable).parent / "lightdist"  # the console script pip installed
MARK = "LIGHTDIST_TEST_RUN"


def marked_processes(mark: str) -> list[int]:
    """PIDs of live processes whose environment carries ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_cli(*args: str | Path, cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``lightdist *args`` (stdout and stderr merged into one pipe); returns it and its marker."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(LIGHTDIST), *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc, mark


def assert_nothing_left(mark: str, what: str, grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = marked_processes(mark)
    assert not left, f"{what} left processes running: {left}"


def run_cli(
    *args: str | Path,
    cwd: Path,
    timeout: float = 100.0,
    env: dict[str, str] | None = None,
    check: bool = True,
    terminal: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``lightdist *args`` in ``cwd``; assert exit 0 when ``check``; assert nothing is left running.

    ``terminal``: in a pty (``tests.terminal``), as in a shell: ``stdout`` is everything drawn on it
    (stderr included, escape sequences and all; read it with ``tests.terminal.Screen``)."""
    mark = uuid.uuid4().hex
    full_env = {**os.environ, **(env or {}), MARK: mark, "PYTHONUNBUFFERED": "1"}
    argv = [str(LIGHTDIST), *map(str, args)]
    if terminal:
        status, drawn = run_in_terminal(argv, cwd=cwd, env=full_env, timeout=timeout)
        proc = subprocess.CompletedProcess(argv, status, drawn, "")
    else:
        proc = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert_nothing_left(mark, f"lightdist {' '.join(map(str, args))}")
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


class Board:
    """``lightdist <command> --port 0 ...`` in a subprocess; ``url`` is read from its first stdout line."""

    def __init__(self, command: str, *args: str | Path, stderr: Path) -> None:
        self.mark = uuid.uuid4().hex  # inherited by anything it starts, found even after re-parenting
        env = {**os.environ, MARK: self.mark}
        self.stderr = stderr
        with stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [str(LIGHTDIST), command, "--port", "0", *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="tb-cli-stdout", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # EOF: the process has exited

    def url(self, timeout: float = 30.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no URL line within {timeout}s; stderr: {self.stderr.read_text()}")
        assert line, f"exited {self.proc.poll()} before printing a URL; stderr: {self.stderr.read_text()}"
        assert line.startswith("TensorBoard ") and "press Ctrl-C to stop" in line, line
        return line.split(" at ", 1)[1].split()[0]

    def stop(self, sig: signal.Signals) -> int:
        """Send ``sig``; return the exit status (within 10 s) after checking nothing was left running."""
        started = descendants(self.proc.pid)  # e.g. a tensorboard-data-server, were it ever started
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=10)
        self.reader.join(timeout=5)
        deadline = time.monotonic() + 5
        while (marked_processes(self.mark) or any(map(pid_alive, started))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not marked_processes(self.mark) and not any(map(pid_alive, started)), "processes outlived the CLI"
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.reader.join(timeout=5)


def poll_json(url: str, params: dict[str, str] | None, ready: Any, timeout: float = 30.0, post: Any = None) -> Any:
    """GET ``url`` (POST ``post`` as JSON, if given) until ``ready(json)`` holds: TensorBoard loads
    the logdir in a background thread."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        if post is None:
            response = httpx.get(url, params=params, timeout=5.0)
        else:
            response = httpx.post(url, json=post, timeout=5.0)
        if response.status_code == 200:
            body = response.json()
            if ready(body):
                return body
        time.sleep(0.2)
    pytest.fail(f"{url} {params}: not ready within {timeout}s; last answer: {body}")
