"""The server's HTTP client: what the thin CLI, ``PoolStrategy(server=...)`` and tests talk through.

Standard library only (``http.client``, ``json``): a client that runs jobs on a warm server must
start in a fraction of a second, so it imports neither torch nor Lightning nor an HTTP framework.
One :class:`Client` keeps one keep-alive connection for requests; each event stream opens its own.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BadInput",
    "Client",
    "Server",
    "ServerError",
    "ServerGone",
    "default_state_dir",
    "find_server",
]

# Files of a state directory (written by `lightdist serve`, read by clients on the same host).
SERVER_FILE = "server.json"
TOKEN_FILE = "token"

# The server sends a keepalive comment every second; a stream silent for this long is dead.
_STREAM_READ_TIMEOUT_S = 5.0


class ServerError(Exception):
    """The server answered with an error: ``status`` (HTTP) and its ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadInput(ServerError):
    """The server refused a job before queueing it (400): the config or a field is wrong."""


class ServerGone(ServerError):
    """No server answers at the address (refused, closed or silent): it is not running or it died."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


@dataclass(frozen=True)
class Server:
    """Where a server listens and the token that lets a client in."""

    url: str
    token: str


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/lightdist``, or ``~/.local/state/lightdist``: where ``lightdist serve``
    keeps its token, its address and its job database unless told ``--state-dir``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lightdist"


def find_server(url: str | None = None, state_dir: str | Path | None = None, token: str | None = None) -> Server:
    """The server to talk to.

    ``url`` None or ``"auto"``: the server running from ``state_dir`` (default
    :func:`default_state_dir`) on this host. A token comes from ``token``, else from the URL's
    ``?token=`` (as printed by ``lightdist serve``), else from the state directory's token file.
    """
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    if url is None or url == "auto":
        info_file = directory / SERVER_FILE
        try:
            info = json.loads(info_file.read_text())
        except FileNotFoundError:
            raise ServerGone(
                f"no lightdist server is running from {directory} (no {SERVER_FILE}): start one with "
                "'lightdist serve', or pass --server URL"
            ) from None
        except (OSError, ValueError) as exc:
            raise ServerGone(f"cannot read {info_file}: {exc}") from None
        url = str(info["url"])
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a server URL looks like http://127.0.0.1:8765, not {url!r}")
    query = urllib.parse.parse_qs(parts.query)
    token = token or (query["token"][0] if "token" in query else None)
    if token is None:
        token_file = directory / TOKEN_FILE
        try:
            token = token_file.read_text().strip()
        except OSError:
            raise ServerError(
                401,
                f"no token for {url}: pass one in the URL (?token=...) or run on the server's host, "
                f"where {token_file} holds it",
            ) from None
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return Server(url=base, token=token)


class Client:
    """Requests to one server. Not thread-safe: one per thread (each holds one connection).

    Example::

        client = Client(find_server())
        job = client.submit("fit", ["--config", "digits/pretrain-cpu"], cwd=os.getcwd())
        for event_id, kind, data in client.events(job["id"]):
            print(kind, data)
    """

    def __init__(self, server: Server, timeout: float = 10.0) -> None:
        self.server = server
        self.timeout = timeout
        parts = urllib.parse.urlsplit(server.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path
        self._conn: http.client.HTTPConnection | None = None

    # --- the API ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """``GET /v1/server``: the server's layout and state."""
        return self._json("GET", "/v1/server")

    def submit(
        self,
        command: str,
        args: list[str],
        cwd: str,
        name: str | None = None,
        restarts: int = 0,
        attach: bool = False,
    ) -> dict[str, Any]:
        """Queue a CLI job; raises :class:`BadInput` (nothing queued) when its config is wrong."""
        body = {"command": command, "args": args, "cwd": cwd, "name": name, "restarts": restarts, "attach": attach}
        return self._json("POST", "/v1/jobs", body)

    def submit_call(
        self, blob: bytes, cwd: str, command: str = "fit", name: str | None = None, attach: bool = True
    ) -> dict[str, Any]:
        """Queue a Python-client call (the pickled Trainer call of ``PoolStrategy(server=...)``);
        with ``attach`` it is cancelled once no ``attach=True`` event stream of it is open."""
        fields = {"cwd": cwd, "command": command, "attach": "1" if attach else "0"}
        if name is not None:
            fields["name"] = name
        query = urllib.parse.urlencode(fields)
        return self._json("POST", f"/v1/calls?{query}", blob, content_type="application/octet-stream")

    def jobs(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        query = urllib.parse.urlencode({k: v for k, v in {"state": state, "limit": limit}.items() if v is not None})
        jobs: list[dict[str, Any]] = self._json("GET", f"/v1/jobs?{query}")["jobs"]
        return jobs

    def job(self, job_id: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{int(job_id)}")

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Cancel a queued or running job (a running one stops at a batch all ranks agree on)."""
        return self._json("POST", f"/v1/jobs/{int(job_id)}/cancel", {})

    def result(self, job_id: int) -> bytes:
        """A finished call job's pickled result."""
        status, _, body = self._request("GET", f"/v1/jobs/{int(job_id)}/result")
        if status != 200:
            raise _error(status, body)
        return body

    def events(self, job_id: int, after: int | None = None, attach: bool = False) -> Iterator[tuple[int, str, Any]]:
        """The job's events as ``(id, type, data)``, from the start or after event ``after``;
        ends after the ``finished`` event. A dropped connection is resumed with ``Last-Event-ID``
        (nothing is lost or repeated); a server that is gone raises :class:`ServerGone`."""
        last = after
        failures = 0  # reconnects in a row that brought nothing: a server that answers but cannot stream
        while True:
            finished = False
            seen = last
            try:
                for event_id, kind, data in self._stream(job_id, last, attach):
                    last = event_id
                    yield event_id, kind, data
                    if kind == "finished":
                        finished = True
                        return
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError):
                pass  # dropped or silent: reconnect once below; refused there means the server is gone
            if finished:
                return
            failures = 0 if last != seen else failures + 1
            if failures >= 5:
                raise ServerGone(f"the event stream of job {job_id} at {self.server.url} keeps dropping")
            self._probe()

    # --- plumbing ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests: no Nagle delay
        return conn

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.server.token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, str, bytes]:
        # One retry on a fresh connection: the server may have closed an idle keep-alive one.
        for attempt in (0, 1):
            try:
                if self._conn is None:
                    self._conn = self._connect(self.timeout)
                self._conn.request(method, self._prefix + path, body=body, headers=self._headers(content_type))
                response = self._conn.getresponse()
                return response.status, response.getheader("Content-Type", ""), response.read()
            except ConnectionRefusedError:
                self.close()
                raise ServerGone(f"no lightdist server answers at {self.server.url} (connection refused)") from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt or method != "GET" and not isinstance(exc, http.client.RemoteDisconnected):
                    raise ServerGone(f"the lightdist server at {self.server.url} went away ({exc})") from None
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        status, _, raw = self._request(method, path, data, content_type if data is not None else None)
        if status >= 400:
            raise _error(status, raw)
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def _probe(self) -> None:
        try:
            self.info()
        except ServerGone:
            raise
        except ServerError:
            pass  # it answers: the stream is resumed by the caller's loop

    def _stream(self, job_id: int, after: int | None, attach: bool) -> Iterator[tuple[int, str, Any]]:
        conn = self._connect(_STREAM_READ_TIMEOUT_S)
        try:
            headers = self._headers()
            headers["Accept"] = "text/event-stream"
            if after is not None:
                headers["Last-Event-ID"] = str(after)
            path = f"{self._prefix}/v1/jobs/{int(job_id)}/events" + ("?attach=1" if attach else "")
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                raise _error(response.status, response.read())
            yield from _parse_sse(response)
        finally:
            conn.close()


def _parse_sse(response: http.client.HTTPResponse) -> Iterator[tuple[int, str, Any]]:
    event_id: int | None = None
    kind = "message"
    data: list[str] = []
    while True:
        line = response.readline()
        if not line:
            return  # the server closed the stream
        text = line.decode().rstrip("\r\n")
        if not text:
            if data and event_id is not None:
                yield event_id, kind, json.loads("\n".join(data))
            event_id, kind, data = None, "message", []
        elif text.startswith(":"):
            continue  # keepalive comment
        else:
            field, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = int(value)
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)


def _error(status: int, raw: bytes) -> ServerError:
    try:
        message = str(json.loads(raw)["message"])
    except (ValueError, KeyError, TypeError):
        message = raw.decode(errors="replace").strip() or http.client.responses.get(status, "error")
    cls = BadInput if status == 400 else ServerError
    return cls(status, message)


def wait_for_server(server: Server, timeout: float) -> dict[str, Any]:
    """Poll ``GET /v1/server`` until the server answers (ready or not), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    with Client(server, timeout=min(timeout, 5.0)) as client:
        while True:
            try:
                return client.info()
            except ServerGone:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
