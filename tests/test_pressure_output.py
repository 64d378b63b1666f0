"""Rank output under pressure and what a finished call leaves behind (issue 12, items 3, 5, 8, 11):
a driver whose stdout nobody reads, multi-byte characters across read boundaries, a large payload's
memory after the call, a worker that skips ``super().__init__()``. Real processes throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lightdist import DistributedRunner, DistributedWorker, WorkerError
from tests.conftest import wait_until

# --- 5. a driver whose stdout is never read ------------------------------------------------------

BLOCKED_STDOUT_DRIVER = """
import json, os, signal, sys, time
from pathlib import Path
from lightdist import DistributedRunner, DistributedWorker

here = Path(sys.argv[1])

def report(**fields):  # our stdout is the pipe nobody reads: results go to a file
    with (here / "report.jsonl").open("a") as f:
        f.write(json.dumps(fields) + "\\n")

def wait_for(name, timeout):
    deadline = time.monotonic() + timeout
    while not (here / name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)

def timed(fn):
    started = time.monotonic()
    try:
        return True, fn(), time.monotonic() - started
    except Exception as exc:
        return False, repr(exc), time.monotonic() - started

class Chatty(DistributedWorker):
    def __call__(self, streaming=False, megabytes=0):
        line = "x" * 999
        for _ in range(megabytes * 1000):
            print(line)
        sys.stdout.flush()
        return "done"

runner = DistributedRunner(Chatty, world_size=2, grace_period=0.5)
runner.start_sync(timeout=120)
calls = [timed(lambda: runner.invoke_sync({"megabytes": 4}, timeout=10)) for _ in range(2)]
report(phase="chatty", calls=calls)

os.kill(runner.pids[1], signal.SIGKILL)
ok, _, took = timed(lambda: runner.invoke_sync({"megabytes": 1}, timeout=10))  # fails: a rank died
recovered = timed(lambda: runner.invoke_sync({"megabytes": 1}, timeout=10))
report(phase="recovered", died_call=ok, next_call=recovered, state=runner.stats().state)

wait_for("drained", 30)  # the test reads our stdout until the notice of dropped output
chatty = timed(lambda: runner.invoke_sync({"megabytes": 4}, timeout=10))  # nobody reads again
stopped = timed(lambda: runner.stop_sync(timeout=3))
report(phase="stopped", chatty=chatty, stop=stopped)
wait_for("bye", 30)
"""

NOTICE = b"[lightdist] dropped "


def _notice(seen: bytes) -> str | None:
    """The first whole notice line of dropped output in ``seen``, if one arrived yet."""
    at = seen.find(NOTICE)
    if at < 0 or b"\n" not in seen[at:]:
        return None
    return seen[at:].split(b"\n", 1)[0].decode()


def _reports(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return {r["phase"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_unread_driver_stdout_never_blocks_recovery_or_stop(tmp_path: Path) -> None:
    """Ranks print MBs while the driver's stdout is a pipe nobody reads: calls still return, a
    killed rank is replaced and the next call works, stop(timeout=3) takes seconds, and once the
    pipe is read again a notice says how much rank output was dropped."""
    script = tmp_path / "driver.py"
    script.write_text(BLOCKED_STDOUT_DRIVER)
    report = tmp_path / "report.jsonl"
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=stderr, env={**os.environ}
        )
    try:
        assert wait_until(lambda: "recovered" in _reports(report) or proc.poll() is not None, 120, interval=0.1)
        phases = _reports(report)
        assert "recovered" in phases, (tmp_path / "stderr.txt").read_text()[-3000:]
        for ok, value, took in phases["chatty"]["calls"]:
            assert ok and value == "done" and took < 5, (value, took)
        assert phases["recovered"]["died_call"] is False  # the call the kill interrupted
        ok, value, took = phases["recovered"]["next_call"]
        assert ok and value == "done" and took < 5, (value, took)
        assert phases["recovered"]["state"] == "ready"

        # Read the pipe now: what the template kept comes through, then the notice.
        assert proc.stdout is not None
        seen = bytearray()

        def read_until_notice() -> None:
            deadline = time.monotonic() + 20
            while _notice(seen) is None and time.monotonic() < deadline:
                chunk = os.read(proc.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]
                if not chunk:
                    return
                seen.extend(chunk)

        reader = threading.Thread(target=read_until_notice, daemon=True)
        reader.start()
        reader.join(timeout=25)
        notice = _notice(seen)
        assert notice is not None, bytes(seen[-500:])
        assert "bytes of rank output (the driver's stdout was not being read)" in notice, notice
        assert int(notice.split()[2]) > 1 << 20, notice  # most of the ~18 MB the ranks printed was dropped

        (tmp_path / "drained").touch()  # the driver prints again into the unread pipe, then stops
        assert wait_until(lambda: "stopped" in _reports(report) or proc.poll() is not None, 60, interval=0.1)
        phases = _reports(report)
        assert "stopped" in phases, (tmp_path / "stderr.txt").read_text()[-3000:]
        ok, value, took = phases["stopped"]["chatty"]
        assert ok and took < 5, (value, took)
        ok, value, took = phases["stopped"]["stop"]
        assert ok and took < 5, (value, took)
        (tmp_path / "bye").touch()
        proc.communicate(timeout=60)
        assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --- 8. multi-byte characters across read boundaries ---------------------------------------------

UTF8_DRIVER = """
import sys, time
from lightdist import DistributedRunner, DistributedWorker

class Wide(DistributedWorker):
    def __call__(self, streaming=False):
        for i in range(40):
            # 100,002 and 80,004 bytes a line: every 64 KiB read of the pipes cuts a line, and most
            # cuts fall inside a character.
            print(f"{i} " + "é" * 50000)
            print(f"{i} " + "\U0001f600" * 20000, file=sys.stderr)
            time.sleep(0.005)  # keep the pace a reading driver keeps up with (no output dropped)
        print("long " + "é" * 700000)  # 1.4 MB: longer than a line may wait, so passed on in pieces
        return "printed"

runner = DistributedRunner(Wide, world_size=2)
runner.start_sync(timeout=120)
print("CALL", runner.invoke_sync(timeout=60), file=sys.stderr)
runner.stop_sync()
"""


def test_multibyte_characters_arrive_intact(tmp_path: Path) -> None:
    """Every line of two ranks printing long lines of 2- and 4-byte characters reaches the driver's
    stdout and stderr whole: no character is split into replacement characters, no line is cut."""
    script = tmp_path / "driver.py"
    script.write_text(UTF8_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        timeout=180,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "CALL printed" in err
    assert (out.count("\ufffd"), err.count("\ufffd")) == (0, 0), "replacement characters in stdout, stderr"
    assert "[lightdist] dropped" not in out + err
    out_lines, err_lines = set(out.splitlines()), set(err.splitlines())
    missing = [
        (stream, rank, i)
        for rank in (0, 1)
        for i in range(40)
        for stream, line, lines in (
            ("stdout", f"[rank {rank}] {i} " + "é" * 50000, out_lines),
            ("stderr", f"[rank {rank}] {i} " + "\U0001f600" * 20000, err_lines),
        )
        if line not in lines
    ]
    assert not missing, f"{len(missing)} lines did not arrive whole, e.g. {missing[:5]}"
    for rank in (0, 1):  # the long line's pieces, each cut between characters, hold all of it
        prefix = f"[rank {rank}] "
        pieces = [line.removeprefix(prefix).removeprefix("long ") for line in out_lines if line.startswith(prefix)]
        pieces = [piece for piece in pieces if not piece.strip("é")]
        assert sum(piece.count("é") for piece in pieces) == 700000, [len(piece) for piece in pieces]


# --- 3. a finished call's payload is released ----------------------------------------------------


class Sizer(DistributedWorker):
    def __call__(self, streaming: bool = False, blob: bytes = b"") -> int:
        return len(blob)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_ranks_release_the_payload_when_the_call_ends() -> None:
    """After a call with a 200 MB payload returns, each rank's RSS falls back near where it was
    before the call, without waiting for the next call to replace the payload."""
    runner = DistributedRunner(Sizer, world_size=2)
    runner.start_sync(timeout=120)
    try:
        runner.invoke_sync({"blob": b"warm"}, timeout=30)
        pids = dict(runner.pids)
        before = {rank: _rss_mb(pid) for rank, pid in pids.items()}
        blob = b"\x01" * (200 << 20)
        assert runner.invoke_sync({"blob": blob}, timeout=60) == len(blob)
        del blob
        settled = wait_until(lambda: all(_rss_mb(pid) < before[r] + 50 for r, pid in pids.items()), 5, interval=0.1)
        after = {rank: _rss_mb(pid) for rank, pid in pids.items()}
        assert settled, f"RSS in MB before the call {before}, after it {after}"
        assert runner.pids == pids  # the same ranks: nothing was respawned
    finally:
        runner.stop_sync()


# --- 11. a worker whose __init__ skips the base class's ------------------------------------------


class NoSuperInit(DistributedWorker):
    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.label = "mine"  # and no super().__init__(rank, world_size)


def test_worker_init_without_super_fails_at_start() -> None:
    """A subclass whose __init__ skips super().__init__() fails start() with a message that says
    what to fix, instead of failing every later call with an AttributeError."""
    runner = DistributedRunner(NoSuperInit, world_size=2)
    try:
        with pytest.raises(WorkerError) as caught:
            runner.start_sync(timeout=120)
        assert caught.value.exc_type == "TypeError"
        assert "NoSuperInit.__init__ must call super().__init__(...)" in str(caught.value)
        assert not runner.is_alive()
    finally:
        runner.stop_sync()  # a no-op after a failed start; stops the pool that started without the check
