"""``lightdist serve``: one warm pool behind the job API, until SIGTERM or Ctrl-C.

Start order (each step's failure is one line and exit status 1 or 2, and leaves nothing running):
the state directory and its lock (one server per directory), the token, the listening socket (so a
busy port fails at once), then HTTP comes up answering ``state: starting`` while the pool starts in
a thread; jobs wait for it. Stop order: no new jobs, the running job is interrupted (and requeued if
it asked for restarts), the pool stops, ``server.json`` goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lightdist.server._client import SERVER_FILE, TOKEN_FILE, Server, ServerGone, default_state_dir, wait_for_server

__all__ = ["main"]

DEFAULT_PORT = 8765
_LOCK_FILE = "server.lock"
_LOG_FILE = "server.log"
_DB_FILE = "jobs.db"
_RUNS_DIR = "runs"  # the dashboard's default working directory for the jobs it submits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightdist serve",
        description="Keep one warm pool up and run jobs on it (docs/server.md).",
    )
    parser.add_argument("--devices", type=int, default=2, help="ranks in the pool (default 2)")
    parser.add_argument("--accelerator", choices=("cpu", "cuda", "gpu"), default="cpu", help="default cpu")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one")
    parser.add_argument(
        "--state-dir", type=Path, default=None, help=f"token, jobs, logs (default {default_state_dir()})"
    )
    parser.add_argument(
        "--preload", action="append", default=[], metavar="MODULE", help="import MODULE in the ranks at start (repeat)"
    )
    parser.add_argument(
        "--max-call-bytes", type=int, default=16 << 30, help="largest Python-client call accepted (default 16 GiB)"
    )
    parser.add_argument(
        "--tensorboard-url",
        default=None,
        metavar="URL",
        help="a TensorBoard serving this server's runs (lightdist tensorboard): the dashboard links to it",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--background", action="store_true", help="start in the background, print its URL and return")
    mode.add_argument("--stop", action="store_true", help="stop the server running from --state-dir")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    state_dir: Path = (args.state_dir or default_state_dir()).expanduser().resolve()
    if args.stop:
        return _stop(state_dir)
    if args.devices < 1:
        return _fail("--devices must be at least 1", status=2)
    if not 0 <= args.port <= 65535:
        return _fail(f"--port {args.port} is not a port number", status=2)
    if args.background:
        return _background(argv, state_dir)
    return _serve(args, state_dir)


def _fail(message: str, status: int = 1) -> int:
    print(f"lightdist serve: error: {message}", file=sys.stderr, flush=True)
    return status


def _say(message: str) -> None:
    print(f"lightdist serve: {message}", flush=True)


# --- foreground --------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace, state_dir: Path) -> int:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.chmod(state_dir, 0o700)  # also when it existed: jobs.db holds command lines and tracebacks
    except PermissionError:
        return _fail(f"{state_dir} belongs to another user; pass a --state-dir of your own")
    lock = _lock(state_dir)
    if lock is None:
        return _fail(
            f"a server is already running from {state_dir} ({_running_url(state_dir)}); stop it with "
            f"'lightdist serve --stop --state-dir {state_dir}' or pass another --state-dir"
        )
    try:
        token = _token(state_dir)
        try:
            sock = _listen(args.host, args.port)
        except OSError as exc:
            return _fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pass --port 0 for a free port")
        with sock, _handle_term():
            return _run(args, state_dir, token, sock)
    finally:
        lock.close()


def _run(args: argparse.Namespace, state_dir: Path, token: str, sock: socket.socket) -> int:
    import uvicorn

    from lightdist.server._app import Notifier, build_app
    from lightdist.server._cli_job import Layout
    from lightdist.server._jobs import Executor
    from lightdist.server._store import JobStore

    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}"
    accelerator = "cuda" if args.accelerator in ("cuda", "gpu") else "cpu"
    layout = Layout(args.devices, accelerator)
    store = JobStore(state_dir / _DB_FILE)
    notifier = Notifier()
    ready = threading.Event()
    pool = _PoolStarter(layout, args.preload)
    executor = Executor(store, pool, layout, notifier.notify, ready)
    executor.recover()
    started_at = time.time()
    runs_dir = state_dir / _RUNS_DIR
    runs_dir.mkdir(exist_ok=True)

    def info() -> dict[str, Any]:
        queued, running = executor.status()
        return {
            "version": _version(),
            "pid": os.getpid(),
            "url": url,
            "world_size": layout.world_size,
            "accelerator": layout.accelerator,
            "state": pool.state,
            "error": pool.error,
            "queued": queued,
            "running": running,
            "rank_pids": pool.rank_pids(),
            "state_dir": str(state_dir),
            "runs_dir": str(runs_dir),
            "tensorboard_url": args.tensorboard_url,
            "started_at": started_at,
        }

    app = build_app(executor, notifier, info, args.max_call_bytes, token)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
    server = uvicorn.Server(config)
    _write_server_file(state_dir, {"url": url, "pid": os.getpid(), "started_at": started_at})
    _say(f"{layout.world_size} {accelerator} rank(s) starting; jobs and events in {state_dir / _DB_FILE}")
    _say(f"listening on {url} (token in {state_dir / TOKEN_FILE})")
    _say(f"open {url}/?token={token}")

    def start_pool() -> None:
        if pool.start():
            ready.set()
            _say(f"pool ready in {time.time() - started_at:.1f} s: {pool.rank_pids()}")
        else:
            print(f"lightdist serve: error: the pool did not start:\n{pool.error}", file=sys.stderr, flush=True)
            server.should_exit = True

    starter = threading.Thread(target=start_pool, name="lightdist-server-start", daemon=True)
    executor.start()
    starter.start()
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        _say("stopping")
        executor.stop(timeout=30)
        starter.join(timeout=5)
        pool.stop()
        store.close()
        with contextlib.suppress(FileNotFoundError):
            (state_dir / SERVER_FILE).unlink()
    return 1 if pool.state == "failed" else 0


class _PoolStarter:
    """The server's pool: a ``DistributedRunner`` of Trainer workers, started in the background and
    registered as the process-wide pool for its layout (so ``strategy="lightdist"`` in any job runs
    on it)."""

    def __init__(self, layout: Any, preload: list[str]) -> None:
        self.layout = layout
        self.preload = preload
        self.runner: Any = None
        self.state = "starting"
        self.error: str | None = None

    def start(self) -> bool:
        try:
            from lightdist.lightning import strategy
            from lightdist.lightning._worker import TrainerWorker
            from lightdist.runner import DistributedRunner
            from lightdist.server import _cli_job  # noqa: F401  (LightningCLI, imported before the first job)

            runner = DistributedRunner(
                TrainerWorker,
                world_size=self.layout.world_size,
                accelerator=self.layout.accelerator,
                preload=("lightning", *self.preload),
            )
            self.runner = runner
            runner.start_sync()
            with strategy._pools_lock:
                strategy._pools[(self.layout.world_size, self.layout.accelerator)] = runner
        except Exception as exc:  # noqa: BLE001 - reported by the server, which then stops
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return False
        self.state = "ready"
        return True

    def interrupt(self, force: bool = False) -> bool:
        return bool(self.runner is not None and self.runner.interrupt(force=force))

    def rank_pids(self) -> dict[int, int]:
        return dict(self.runner.pids) if self.runner is not None and self.runner.is_alive() else {}

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop_sync()


# --- files of the state directory ---------------------------------------------------------------
def _lock(state_dir: Path) -> Any:
    handle = open(state_dir / _LOCK_FILE, "a+")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _token(state_dir: Path) -> str:
    path = state_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def _write_server_file(state_dir: Path, info: dict[str, Any]) -> None:
    tmp = state_dir / (SERVER_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(state_dir / SERVER_FILE)


def _running_url(state_dir: Path) -> str:
    try:
        info = json.loads((state_dir / SERVER_FILE).read_text())
        return f"{info['url']}, pid {info['pid']}"
    except (OSError, ValueError, KeyError):
        return "address unknown"


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they
    # are TCP, and accepted sockets inherit it. Without it every response on a kept-alive connection
    # and every event of a stream waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


@contextlib.contextmanager
def _handle_term() -> Any:
    """SIGTERM stops the server as Ctrl-C does (uvicorn re-raises what it caught once it has shut
    down: with this handler that becomes a clean exit, not a kill that skips stopping the pool)."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _version() -> str:
    from lightdist import __version__

    return __version__


# --- background and stop -----------------------------------------------------------------------
def _background(argv: list[str], state_dir: Path) -> int:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    rest = [a for a in argv if a != "--background"]
    if not any(a == "--state-dir" or a.startswith("--state-dir=") for a in rest):
        rest += ["--state-dir", str(state_dir)]
    log = open(state_dir / _LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
    with log:
        child = subprocess.Popen(
            [sys.executable, "-m", "lightdist.cli", "serve", *rest],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in this terminal's process group: Ctrl-C here does not stop it
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return _fail(
                f"the server exited ({child.returncode}); its log: {state_dir / _LOG_FILE}\n{_tail(state_dir)}"
            )
        info = _server_file(state_dir)
        if info is not None and info.get("pid") == child.pid:
            try:
                status = wait_for_server(Server(info["url"], _token(state_dir)), timeout=5)
            except ServerGone:
                status = {}
            if status.get("state") == "ready":
                _say(f"running in the background (pid {child.pid}) at {info['url']}; log: {state_dir / _LOG_FILE}")
                _say(f"stop it with: lightdist serve --stop --state-dir {state_dir}")
                return 0
        time.sleep(0.2)
    child.terminate()
    return _fail(f"the server did not become ready within 600 s; its log: {state_dir / _LOG_FILE}")


def _stop(state_dir: Path) -> int:
    info = _server_file(state_dir)
    if info is None:
        return _fail(f"no server is running from {state_dir} (no {SERVER_FILE})")
    pid = int(info["pid"])
    if not _is_server(pid):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / SERVER_FILE).unlink()
        return _fail(f"the server (pid {pid}) is not running any more; removed its stale {SERVER_FILE}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _is_server(pid):
        time.sleep(0.1)
    if _is_server(pid):
        os.kill(pid, signal.SIGKILL)
        _say(f"the server (pid {pid}) did not stop within 60 s: killed")
        return 1
    _say(f"stopped the server (pid {pid})")
    return 0


def _server_file(state_dir: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads((state_dir / SERVER_FILE).read_text())
        return info
    except (OSError, ValueError):
        return None


def _is_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"serve" in cmdline and stat[stat.rindex(")") + 2] != "Z"


def _tail(state_dir: Path, lines: int = 20) -> str:
    try:
        return "\n".join((state_dir / _LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
