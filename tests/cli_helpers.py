"""Run the real ``lightdist`` console script in a subprocess, and prove it left no process behind.

Workers that outlive the CLI would be re-parented to init and escape the autouse leak checker (it
looks at this process's descendants), so every run is tagged with an environment marker that forked
ranks inherit, and :func:`run_cli` fails if any process still carries the marker after the CLI has
exited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

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
