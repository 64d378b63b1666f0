"""``lightdist tensorboard`` (alias ``lightdist view``): serve a run directory with TensorBoard.

::

    lightdist tensorboard                          # logdir runs, http://127.0.0.1:6006/
    lightdist view --logdir runs/digits --port 0   # any free port; the URL is printed
    lightdist tensorboard --host 0.0.0.0           # share it on the network (opt-in)

The server runs in this process, rereads the logdir every ``--reload_interval`` seconds (so curves
grow while a fit writes them), and stops on Ctrl-C or SIGTERM with exit status 0.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["main", "view_hint"]

PROG = "lightdist tensorboard"


def view_hint(log_dir: str | os.PathLike[str]) -> str:
    """The line ``lightdist fit`` prints about a TensorBoardLogger's ``log_dir``.

    The command names the logger's ``root_dir`` (the parent of ``log_dir``, i.e. ``save_dir/name``),
    not the version folder: every ``version_N`` of that experiment then shows side by side as a run
    of its own, and a later fit appears without restarting TensorBoard.
    """
    path = Path(log_dir)
    command = f"lightdist tensorboard --logdir {shlex.quote(str(path.parent))}"
    return f"TensorBoard logs: {path} — watch them live with: {command}"


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535; 0 picks a free one)")
    return port


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a run directory with TensorBoard.")
    parser.add_argument("--logdir", default="runs", help="directory searched for event files (default: runs)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 shares it)",
    )
    parser.add_argument("--port", type=_port, default=6006, help="TCP port (default: 6006; 0 picks a free port)")
    parser.add_argument(
        "--reload_interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="reread the logdir this often (default: 2; 0 reads it once)",
    )
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _bind_error(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None. Checked up front because werkzeug's server,
    on a failed bind, prints its own lines and calls sys.exit(1) (werkzeug/serving.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as werkzeug picks it
    try:
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            probe.bind(address)
    except OSError as exc:
        hint = " (--port 0 picks a free port)" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else ""
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"
    return None


def main(argv: list[str]) -> int:
    """Run the command; returns the exit status (0 after Ctrl-C/SIGTERM, 2 for bad input)."""
    args = _parser().parse_args(argv)
    logdir = Path(args.logdir).expanduser().resolve()
    if not logdir.is_dir():
        what = "is not a directory" if logdir.exists() else "does not exist"
        return _error(
            f"--logdir {args.logdir!r} {what} (run a config first: lightdist fit --config ...; "
            "runs are written under its trainer.default_root_dir)"
        )
    if problem := _bind_error(args.host, args.port):
        return _error(problem)

    # Handlers go in before the server starts, so a signal at any moment ends in the clean path below.
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # An inherited SIG_IGN (e.g. `lightdist tensorboard &` in a script) is kept, as Python itself does.
    caught = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, on_signal) for sig in caught}
    try:
        return _serve(args, logdir, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args: argparse.Namespace, logdir: Path, stop: threading.Event) -> int:
    # Imported here: tensorboard brings absl, grpc and protobuf (about 0.3 s with its plugins), which
    # `lightdist recipes` or `--help` must not pay.
    from tensorboard import program
    from tensorboard.version import VERSION

    servers: list[Any] = []

    def make_server(wsgi_app: Any, flags: Any) -> Any:
        # launch() keeps no handle on the server it starts; record it to shut it down ourselves.
        servers.append(program.create_port_scanning_werkzeug_server(wsgi_app, flags))
        return servers[-1]

    board = program.TensorBoard(server_class=make_server)
    # load_fast="false": the pure Python loader, reading in a daemon thread of this process. The Rust
    # loader (load_fast auto/true) starts `tensorboard-data-server` with subprocess.Popen in
    # tensorboard/data/server_ingester.py and keeps only its stdin, not the Popen: we could neither
    # terminate nor reap it; it ends only when it notices stdin closed (--die-after-stdin), i.e.
    # after we have exited: an orphan, if briefly; and on a slow start (a busy machine) it gives up
    # with "It may still be running as pid N". Its speed (here 120k scalars: <0.1 s against ~3 s)
    # matters for huge logdirs, not for the scalars of a fit.
    # reload_task="thread" pins what "auto" means in LocalDataIngester.start; "process" would fork.
    board.configure(
        logdir=str(logdir),
        host=args.host,
        port=args.port,
        reload_interval=args.reload_interval,
        load_fast="false",
        reload_task="thread",
    )
    try:
        url = str(board.launch())
    except program.TensorBoardServerException as exc:  # the port was taken since _bind_error
        return _error(f"{exc.msg} (--port 0 picks a free port)")
    except SystemExit:  # werkzeug lost the same race; it has printed why
        return 2
    print(f"TensorBoard {VERSION} at {url} (logdir: {logdir}); press Ctrl-C to stop", flush=True)
    # A bounded wait in a loop: the main thread wakes to run the signal handler promptly.
    while not stop.wait(0.5):
        pass
    server = servers[-1]
    server.shutdown()  # stops serve_forever in TensorBoard's thread and waits for it
    server.server_close()  # frees the port
    print("TensorBoard stopped", file=sys.stderr, flush=True)
    return 0
