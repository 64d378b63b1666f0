"""A scripted stand-in for ``lightdist serve`` (docs/server.md's API, standard library only).

It runs no pool: each submitted job replays a list of events, so the thin client's side of the
contract (the bar, the lines, the exit status, Ctrl-C, a server that dies mid-stream) is tested in
milliseconds and deterministically. The real server is tested end to end in test_server_cli.py too.

A script step ``("hold", {})`` keeps the stream open (with keepalives) until a client cancels the
job, or for ever with ``FakeServer(ignore_cancel=True)``; ``kill()`` then drops every connection and
stops listening, as a server process that died.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Script = list[tuple[str, dict[str, Any]]]

KEEPALIVE_S = 0.2


def fit_script(epochs: int = 2, batches: int = 3, exit_code: int = 0, error: dict[str, Any] | None = None) -> Script:
    """The events of a short fit, as the server sends them."""
    script: Script = [
        ("queued", {"position": 1}),
        ("started", {"command": "fit", "attempt": 1, "world_size": 2}),
        ("log", {"message": "lightdist: fit on 2 rank(s), CPUAccelerator, PoolStrategy"}),
        ("run_start", {"fn": "fit", "max_epochs": epochs, "max_steps": -1}),
    ]
    step = 0
    for epoch in range(epochs):
        script.append(("epoch_start", {"epoch": epoch, "num_training_batches": batches}))
        for batch in range(batches):
            step += 1
            metrics = {"train_loss": 1.0 / step}
            script.append(("train_batch", {"step": step, "epoch": epoch, "batch": batch, "metrics": metrics}))
        script.append(("validation", {"step": step, "epoch": epoch, "metrics": {"val_acc": 0.5 + epoch / 10}}))
        script.append(("epoch_end", {"step": step, "epoch": epoch, "metrics": {"val_acc": 0.5 + epoch / 10}}))
    state = {0: "succeeded", 130: "cancelled"}.get(exit_code, "failed")
    script += [
        ("run_end", {"fn": "fit", "interrupted": exit_code == 130, "error": None}),
        ("log", {"message": "lightdist: fit metrics: train_loss=0.1667, val_acc=0.6"}),
        (
            "finished",
            {"state": state, "exit_code": exit_code, "metrics": {"val_acc": 0.6}, "artifacts": {}, "error": error},
        ),
    ]
    return script


class FakeServer:
    """Serves on a free loopback port; writes ``server.json`` and ``token`` into ``state_dir``."""

    def __init__(self, state_dir: Path, script: Script, *, ignore_cancel: bool = False) -> None:
        self.script = script
        self.ignore_cancel = ignore_cancel
        self.token = secrets.token_hex(8)
        self.jobs: dict[int, dict[str, Any]] = {}
        self.cancels: list[int] = []
        self.cancelled = threading.Event()
        self.dead = threading.Event()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "server.json").write_text(json.dumps({"url": self.url}))
        (state_dir / "token").write_text(self.token)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-server", daemon=True)
        self._thread.start()

    def submit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if any("--bad" in arg for arg in body.get("args", [])):
            return 400, {"error": "bad_input", "message": "model.lr: Expected a <class 'float'>. Got value: fast"}
        with self._lock:
            job_id = len(self.jobs) + 1
            self.jobs[job_id] = {
                "id": job_id,
                "kind": "cli",
                **{k: body.get(k) for k in ("name", "command", "args", "cwd", "restarts")},
                "attach": body.get("attach"),
                "state": "queued",
                "position": 1,
                "created_at": time.time(),
                "started_at": None,
                "finished_at": None,
                "metrics": {},
                "artifacts": {},
                "error": None,
                "exit_code": None,
            }
        return 201, self.jobs[job_id]

    def cancel(self, job_id: int) -> dict[str, Any]:
        self.cancels.append(job_id)
        self.cancelled.set()
        return self.jobs[job_id]

    def stream(self, handler: BaseHTTPRequestHandler, job_id: int, after: int) -> None:
        for event_id, (kind, fields) in enumerate(self.script, start=1):
            if kind == "hold":
                while not self.dead.is_set() and (self.ignore_cancel or not self.cancelled.is_set()):
                    handler.wfile.write(b": keepalive\n\n")
                    handler.wfile.flush()
                    time.sleep(KEEPALIVE_S)
                continue
            if self.dead.is_set():
                return
            if event_id <= after:
                continue
            data = {"type": kind, "job_id": job_id, "time": time.time(), **fields}
            handler.wfile.write(f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode())
            handler.wfile.flush()
            if kind == "finished":
                self.jobs[job_id].update(state=fields["state"], exit_code=fields["exit_code"], finished_at=time.time())
                return

    def kill(self) -> None:
        """As if the server process died: every connection closed, nothing listening any more."""
        self.dead.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if not self.dead.is_set():
            self.kill()
        self._thread.join(timeout=5)


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with server._lock:
                server._connections.append(self.connection)  # closed by kill(), keep-alive ones too

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, status: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {server.token}":
                self._json(401, {"error": "unauthorized", "message": "no token"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self._authorized():
                return
            path = self.path.split("?")[0].rstrip("/").split("/")
            if path[-1] == "server":
                self._json(200, {"state": "ready", "world_size": 2, "running": None, "queued": 0})
            elif path[-1] == "jobs":
                self._json(200, {"jobs": sorted(server.jobs.values(), key=lambda j: -j["id"])})
            elif path[-1] == "events":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    server.stream(self, int(path[-2]), int(self.headers.get("Last-Event-ID") or 0))
                except OSError:
                    pass  # the client went away
                self.close_connection = True
            elif path[-1].isdigit() and int(path[-1]) in server.jobs:
                self._json(200, server.jobs[int(path[-1])])
            else:
                self._json(404, {"error": "not_found", "message": f"no job {path[-1]}"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            path = self.path.rstrip("/").split("/")
            if path[-1] == "jobs":
                self._json(*server.submit(body))
            elif path[-1] == "cancel":
                self._json(202, server.cancel(int(path[-2])))
            else:
                self._json(404, {"error": "not_found", "message": self.path})

    return Handler
