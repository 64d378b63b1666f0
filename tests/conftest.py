"""Shared fixtures. Every test is checked for leaks: child processes, lightdist threads, environment
variables and a torch.distributed group in the test process must be gone when it ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightdist import DistributedRunner, DistributedWorker

LEAK_GRACE_S = 5.0
ROOT = Path(__file__).resolve().parents[1]
MYPY_TEST = "tests/test_static.py::test_mypy_strict"
# The suite's own helper processes (the background mypy): not children of any test, never a leak.
_helper_pids: set[int] = set()
_mypy: dict[str, Any] = {}


def descendants(pid: int | None = None) -> set[int]:
    """PIDs of every live descendant of ``pid`` (default: this process), read from /proc."""
    root = pid or os.getpid()
    if _mypy and _mypy["proc"].poll() is not None:
        # reaped just now: its PID may be reused from here on, so it must not be skipped any more
        _helper_pids.discard(_mypy["proc"].pid)
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: split after the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue  # a zombie is dead; its parent reaps it
        if int(entry.name) in _helper_pids:
            continue
        try:
            if b"resource_tracker" in (entry / "cmdline").read_bytes():
                continue  # multiprocessing's per-process singleton (ddp_spawn starts it), not ours
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.add(child)
            stack.append(child)
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Callables naming processes a module-scoped fixture owns outside this process's runners (a
# `lightdist serve` subprocess and its ranks, which change when its pool replaces one).
OWNED_ELSEWHERE: list[Any] = []


def _pool_owned() -> set[int]:
    """Processes of pools still running (a module-scoped pool may respawn a rank in a test)."""
    from lightdist.runner import _live_runners

    owned: set[int] = set()
    for more in OWNED_ELSEWHERE:
        owned |= more()
    for runner in list(_live_runners):
        if runner.is_alive():
            template = runner.stats().template_pid
            owned |= {*([template] if template is not None else []), *runner.pids.values()}
    return owned


def _lightdist_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lightdist-") and t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    procs_before = descendants()
    threads_before = _lightdist_threads()
    env_before = dict(os.environ)
    yield
    ok = wait_until(lambda: not (descendants() - procs_before - _pool_owned()), LEAK_GRACE_S)
    leaked = descendants() - procs_before - _pool_owned()
    threads = _lightdist_threads() - threads_before
    wait_until(lambda: not (_lightdist_threads() - threads_before), 2.0)
    threads = _lightdist_threads() - threads_before
    env_changed = {k for k in set(env_before) | set(os.environ) if env_before.get(k) != os.environ.get(k)}
    env_changed -= {"PYTEST_CURRENT_TEST"}
    problems = []
    if not ok and leaked:
        problems.append(f"child processes left running: {sorted(leaked)}")
    if threads:
        problems.append(f"lightdist threads left running: {sorted(t.name for t in threads)}")
    if env_changed:
        problems.append(f"environment variables changed: {sorted(env_changed)}")
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            problems.append("a torch.distributed process group is still initialised in the test process")
            dist.destroy_process_group()
    except ImportError:
        pass
    for pid in leaked:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    if problems:
        pytest.fail("test leaked: " + "; ".join(problems))


class Echo(DistributedWorker):
    """Returns what it was called with, plus where it ran."""

    def setup(self, tag: str = "none", **kwargs: object) -> None:
        self.tag = tag
        self.calls = 0

    def __call__(self, streaming: bool = False, **payload: object) -> dict[str, object]:
        self.calls += 1
        return {"rank": self.rank, "tag": self.tag, "calls": self.calls, "payload": payload, "pid": os.getpid()}


@contextlib.contextmanager
def shared_lightning_pool(strategy_module: Any, worker_cls: type[DistributedWorker], preload: str) -> Iterator[None]:
    """Start the process-wide 2-CPU-rank pool of a PoolStrategy flavour before a module's first test
    (so every test's leak check sees it as already there); stop all its pools afterwards."""
    runner = DistributedRunner(worker_cls, world_size=2, accelerator="cpu", preload=(preload,))
    runner.start_sync(timeout=120)
    strategy_module._pools[(2, "cpu")] = runner
    try:
        yield
    finally:
        for pool in list(strategy_module._pools.values()):
            pool.stop_sync()
        strategy_module._pools.clear()


class SharedServer:
    """One real ``lightdist serve`` (2 CPU ranks) for every test that asks for it (a start costs
    10-15 s, the pool's and the server's Lightning imports). Started by the first of those tests;
    stopped with SIGINT (asserting exit 0 and that nothing it started is left) right after the last
    of them, by ``pytest_runtest_teardown``: a server alive after its tests would be a child of this
    process during every later test, and tests that compare this process's descendants would count
    it. The modules that use it run back to back (``pytest_collection_modifyitems``). A test may
    kill it and then ``stop`` it (which reaps it); the next test to ask gets a new server on the same
    state dir (its history kept). One that dies with nobody stopping it fails the next test to ask.

    Its state dir is STATE/lightdist, so a client with XDG_STATE_HOME=STATE finds it with a bare
    ``--server``. Tests must not assume an empty server or rank pids from before they ran (read them
    at the start)."""

    def __init__(self) -> None:
        self._running: Any = None
        self.state_dir: Path | None = None
        self.last_user: str | None = None  # the nodeid after whose teardown it stops
        self._start_failed: str | None = None

    @property
    def running(self) -> Any:
        """The server, started if there is none (a test that kills it calls ``stop`` afterwards)."""
        from tests.server_helpers import start_server

        if self._running is not None and self._running.proc.poll() is not None:
            output = self._running.output()
            status = self.stop()
            raise AssertionError(f"the shared server exited ({status}) with nobody stopping it:\n{output[-5000:]}")
        if self._start_failed is not None:  # each try costs a start: one failure fails the rest
            raise AssertionError(f"the shared server did not start earlier: {self._start_failed}")
        if self._running is None:
            assert self.state_dir is not None, "the server_holder fixture sets the state dir"
            try:
                self._running = start_server(self.state_dir)
            except BaseException as exc:
                self._start_failed = str(exc)[-5000:]
                raise
        return self._running

    def restart(self, sig: int = signal.SIGTERM) -> int:
        """Stop it with ``sig`` and start a new one on the same state dir; the old one's exit status."""
        status = self.stop(sig)
        self.running  # noqa: B018 - starts it
        return status

    def owned(self) -> set[int]:
        return set() if self._running is None else set(self._running.owned())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it (if it runs) and assert nothing it started is left; its exit status."""
        from tests.server_helpers import stop_server

        running, self._running = self._running, None
        return 0 if running is None else stop_server(running, sig)

    def close(self) -> None:
        """After its last test: SIGINT stops it cleanly (exit 0)."""
        if self._running is not None:
            output = self._running.output()
            assert self.stop(signal.SIGINT) == 0, output


_shared_server = SharedServer()
OWNED_ELSEWHERE.append(_shared_server.owned)


@pytest.fixture(scope="session")
def server_holder(tmp_path_factory: pytest.TempPathFactory) -> SharedServer:
    """The shared server's holder: for a test that restarts it, or a module-scoped fixture."""
    if _shared_server.state_dir is None:
        _shared_server.state_dir = tmp_path_factory.mktemp("shared-server") / "state" / "lightdist"
    return _shared_server


@pytest.fixture
def shared_server(server_holder: SharedServer) -> Any:
    """The shared ``lightdist serve`` (a ``tests.server_helpers.RunningServer``), see ``SharedServer``."""
    return server_holder.running


@pytest.fixture(scope="module")
def echo_pool() -> Iterator[DistributedRunner]:
    """A 2-rank pool shared by a module's tests (start costs seconds; calls cost microseconds)."""
    runner = DistributedRunner(Echo, world_size=2)
    runner.start_sync(timeout=120, tag="shared")
    yield runner
    runner.stop_sync()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-heavy", action="store_true", help="also run tests marked heavy (minutes or GBs)")


def _start_mypy(background: bool) -> None:
    """``mypy`` (strict, pyproject's settings) on this checkout, its output in a file. Without a
    .mypy_cache (a fresh clone, as in CI) it needs ~100 s of CPU: in the ``background`` (nice 19)
    it takes that from the time the tests leave the cores idle instead of adding it at the end."""
    out = tempfile.TemporaryFile()
    nice = shutil.which("nice") if background else None
    command = [*([nice, "-n", "19"] if nice else []), sys.executable, "-m", "mypy"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    _helper_pids.add(proc.pid)
    _mypy.update(proc=proc, out=out)


def _stop_mypy() -> None:
    proc: subprocess.Popen[bytes] = _mypy.pop("proc")
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    _mypy.pop("out").close()
    _helper_pids.discard(proc.pid)


def mypy_result(timeout: float) -> tuple[int, str]:
    """The exit status and output of the background mypy; one still running (starved by other
    load) gets its normal priority back, or, where lowering a nice value is not allowed, is
    started again at normal priority."""
    if _mypy and _mypy["proc"].poll() is None:
        try:
            os.setpriority(os.PRIO_PROCESS, _mypy["proc"].pid, 0)
        except OSError:
            _stop_mypy()
    if not _mypy:
        _start_mypy(background=False)
    proc: subprocess.Popen[bytes] = _mypy["proc"]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        _helper_pids.discard(proc.pid)
    _mypy["out"].seek(0)
    return proc.returncode, _mypy["out"].read().decode(errors="replace")


def pytest_collection_finish(session: pytest.Session) -> None:
    users = [item.nodeid for item in session.items if "server_holder" in getattr(item, "fixturenames", ())]
    _shared_server.last_user = users[-1] if users else None
    if not session.config.option.collectonly and any(item.nodeid == MYPY_TEST for item in session.items):
        _start_mypy(background=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield
    if item.nodeid == _shared_server.last_user:
        _shared_server.close()  # an AssertionError here is reported as this test's teardown error


def pytest_sessionfinish(session: pytest.Session) -> None:
    # a session cut short (-x, Ctrl-C) before the last user ran: stop it all the same
    with contextlib.suppress(Exception):
        _shared_server.close()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _mypy:  # killed if the session ended before test_mypy_strict collected its result
        _stop_mypy()


def _server_modules_back_to_back(items: list[pytest.Item]) -> None:
    """Moves every module that uses the shared server next to the last of them (order kept within),
    so that the server lives through those modules only."""
    paths = {item.path for item in items if "server_holder" in getattr(item, "fixturenames", ())}
    block = [item for item in items if item.path in paths]
    if len(paths) < 2:
        return
    after = items[items.index(block[-1]) + 1 :]
    rest = [item for item in items if item.path not in paths]
    at = rest.index(after[0]) if after else len(rest)
    items[:] = [*rest[:at], *block, *rest[at:]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _server_modules_back_to_back(items)
    if config.getoption("--run-heavy"):
        return
    skip = pytest.mark.skip(reason="heavy: run with --run-heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
