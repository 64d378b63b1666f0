"""Start a real ``lightdist serve`` for a test, talk to it, and prove it left nothing behind.

The server runs as ``python -m lightdist.cli serve`` in a subprocess tagged with the CLI helpers'
environment marker (its ranks inherit it), so a test can check that every process it started is
gone, whether the server stopped cleanly or was killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightdist.server._client import Client, Server, find_server
from tests.cli_helpers import MARK, ROOT, assert_nothing_left, marked_processes
from tests.conftest import descendants

TINY = [
    "--model",
    "tests.server_models.Tiny",
    "--data",
    "tests.server_models.TinyData",
    "--trainer.max_epochs=1",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_model_summary=false",
]


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    state_dir: Path
    mark: str
    server: Server
    log: Path
    clients: list[Client] = field(default_factory=list)

    def client(self, timeout: float = 30.0) -> Client:
        client = Client(self.server, timeout=timeout)
        self.clients.append(client)
        return client

    def info(self) -> dict[str, Any]:
        return self.client().info()

    def owned(self) -> set[int]:
        """The server and its ranks (rank pids change when the pool replaces one)."""
        return {self.proc.pid, *descendants(self.proc.pid)} if self.proc.poll() is None else set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(state_dir: Path, *extra: str, timeout: float = 120.0) -> RunningServer:
    """``lightdist serve --port 0 --state-dir STATE_DIR *extra``, returned once its pool is ready."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1"}
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / f"test-server-{mark[:8]}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightdist.cli", "serve", "--port", "0", "--state-dir", str(state_dir), *extra],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lightdist serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            info = json.loads((state_dir / "server.json").read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            running = RunningServer(proc, state_dir, mark, find_server(state_dir=state_dir), log)
            try:
                if running.info()["state"] == "ready":
                    return running
            except Exception:  # noqa: BLE001 - not answering yet
                pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"lightdist serve was not ready within {timeout} s:\n{log.read_text()}")


def stop_server(running: RunningServer, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    """Stop the server with ``sig``; returns its exit status; asserts nothing it started is left."""
    for client in running.clients:
        client.close()
    if running.proc.poll() is None:
        running.proc.send_signal(sig)
    try:
        status = running.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        running.proc.kill()
        running.proc.wait(10)
        raise AssertionError(f"the server did not stop within {timeout} s after signal {sig}") from None
    assert_nothing_left(running.mark, "lightdist serve")
    return status


@contextmanager
def serving(state_dir: Path, *extra: str) -> Iterator[RunningServer]:
    running = start_server(state_dir, *extra)
    try:
        yield running
    finally:
        stop_server(running)


def client_env(state_dir: Path) -> dict[str, str]:
    """The environment of a ``python -m lightdist.cli`` client process: this checkout first (the
    console script in the venv may belong to another checkout), ``state_dir`` as its default server's
    (``find_server`` reads ``XDG_STATE_HOME/lightdist``: ``state_dir`` must be named ``lightdist``)."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_STATE_HOME"}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    env["XDG_STATE_HOME"] = str(state_dir.parent)
    return env


class ClientProcess:
    """``python -m lightdist.cli *args`` in the background; a thread collects its output (stdout and
    stderr as one stream), so a test can wait for a line and then for the rest."""

    def __init__(self, *args: str | Path, state_dir: Path, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lightdist.cli", *map(str, args)],
            cwd=cwd,
            env=client_env(state_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="client-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # the end of its output
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """Its output up to and including its first line that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i, line in enumerate(self.lines):
                    if line and re.search(pattern, line):
                        return "".join(self.lines[: i + 1])
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == ""):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(self.lines)}")
                self._changed.wait(left)

    def finish(self, timeout: float) -> tuple[int, str]:
        """``(exit status, all its output)`` once it exits; killed when it runs past ``timeout``."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"the client did not exit within {timeout} s:\n{self.output()}") from None
        self._reader.join(10)
        return status, self.output()

    def close(self) -> None:
        """Kill it if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def wait_for_state(client: Client, job_id: int, states: set[str], timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stayed {job['state']} for {timeout} s (wanted {states})")
        time.sleep(0.05)


def events_of(client: Client, job_id: int, after: int | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    return list(client.events(job_id, after=after))


def marked(running: RunningServer) -> list[int]:
    return marked_processes(running.mark)
