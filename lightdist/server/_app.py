"""The job API over HTTP (Starlette): JSON requests, server-sent events, a token on every request.

Handlers are thin: they check the request, call the :class:`~lightdist.server._jobs.Executor` and
turn its answers into JSON. Everything a client can send is bounded (body sizes, list limits) and
every malformed request gets a 4xx with a message; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from lightdist.errors import ConfigError
from lightdist.server._auth import TokenGate
from lightdist.server._dashboard import dashboard_routes
from lightdist.server._jobs import Executor, JobConflict, JobNotFound
from lightdist.server._openapi import openapi_document
from lightdist.server._store import JOB_STATES

__all__ = ["Notifier", "TokenGate", "build_app"]

MAX_JSON_BYTES = 1 << 20  # a job request is a command line: 1 MiB is generous
KEEPALIVE_S = 1.0  # a comment line this often on an idle stream: a dead client is noticed within ~1 s
_COMMANDS = ("fit", "validate", "test", "predict")


class Notifier:
    """Wakes the event streams of a job when the job thread stored a new event (any thread may call
    :meth:`notify`; streams wait on the server's event loop)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, asyncio.Event] = {}

    def notify(self, job_id: int) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: int) -> None:
        event = self._waiters.pop(job_id, None)
        if event is not None:
            event.set()

    def arm(self, job_id: int) -> asyncio.Event:
        """The event set by the job's next :meth:`notify`: arm before reading, then wait, and no
        event stored in between is missed."""
        return self._waiters.setdefault(job_id, asyncio.Event())

    @staticmethod
    async def wait(armed: asyncio.Event, timeout: float) -> bool:
        """Until the armed event fires (True) or ``timeout`` (False)."""
        try:
            await asyncio.wait_for(armed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def build_app(
    executor: Executor,
    notifier: Notifier,
    info: Callable[[], dict[str, Any]],
    max_call_bytes: int,
    token: str,
) -> ASGIApp:
    """The API's ASGI application (see docs/server.md), behind the token gate."""
    validation_lock = threading.Lock()  # one config parse at a time: LightningCLI is not made for threads

    async def server_info(request: Request) -> JSONResponse:
        return JSONResponse(info())

    async def submit(request: Request) -> JSONResponse:
        body = await _json_body(request)
        command, args, cwd, name, restarts, attach = _job_request(body)

        def validate() -> Any:
            from lightdist.server._cli_job import validate_cli_job

            # The client sends its config paths absolute; its own modules (--model mymod.Net) are
            # found as the job will find them, from its directory.
            with validation_lock, _importable_from(cwd):
                return validate_cli_job(command, args, executor.layout)

        try:
            prepared = await run_in_threadpool(validate)
        except ConfigError as error:
            raise HTTPException(400, str(error)) from None
        job = await run_in_threadpool(
            executor.submit,
            kind="cli",
            command=command,
            args=args,
            cwd=cwd,
            name=name,
            restarts=restarts,
            attach=attach,
            prepared=prepared,
        )
        return JSONResponse(job, status_code=201)

    async def submit_call(request: Request) -> JSONResponse:
        blob = await _body(request, max_call_bytes)
        query = request.query_params
        command = query.get("command", "fit")
        if command not in _COMMANDS:
            raise HTTPException(400, f"command must be one of {', '.join(_COMMANDS)}, not {command!r}")
        cwd = query.get("cwd", "")
        if not cwd.startswith("/"):
            raise HTTPException(400, "cwd (query) must be the client's absolute working directory")
        job = await run_in_threadpool(
            executor.submit,
            kind="call",
            command=command,
            args=[],
            cwd=cwd,
            name=_name(query.get("name")),
            attach=query.get("attach", "1") == "1",
            blob=blob,
        )
        return JSONResponse(job, status_code=201)

    async def list_jobs(request: Request) -> JSONResponse:
        state = request.query_params.get("state")
        if state is not None and state not in JOB_STATES:
            raise HTTPException(400, f"state must be one of {', '.join(JOB_STATES)}, not {state!r}")
        limit = _int(request.query_params.get("limit", "50"), "limit", 1, 1000)
        jobs = await run_in_threadpool(executor.jobs, state, limit)
        return JSONResponse({"jobs": jobs, "now": time.time()})  # the server's clock, for elapsed times

    async def show_job(request: Request) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(_job_or_404, executor, request))

    async def cancel_job(request: Request) -> JSONResponse:
        job_id = request.path_params["job_id"]
        try:
            job = await run_in_threadpool(executor.cancel, job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None
        except JobConflict as conflict:
            raise HTTPException(409, str(conflict)) from None
        return JSONResponse(job, status_code=202)

    async def job_result(request: Request) -> Response:
        job = await run_in_threadpool(_job_or_404, executor, request)
        blob = executor.take_result(job["id"])
        if blob is None:
            raise HTTPException(404, f"job {job['id']} has no result to fetch (state {job['state']}; fetched once)")
        return Response(blob, media_type="application/octet-stream")

    async def job_events(request: Request) -> StreamingResponse:
        job = await run_in_threadpool(_job_or_404, executor, request)
        last = request.headers.get("last-event-id") or request.query_params.get("after")
        after = _int(last, "Last-Event-ID", 0, 1 << 62) if last else None
        attach = request.query_params.get("attach") == "1"
        return StreamingResponse(
            _stream(executor, notifier, job["id"], after, attach),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(openapi_document())

    routes = [
        Route("/v1/server", server_info, methods=["GET"]),
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/jobs", list_jobs, methods=["GET"]),
        Route("/v1/calls", submit_call, methods=["POST"]),
        Route("/v1/jobs/{job_id:int}", show_job, methods=["GET"]),
        Route("/v1/jobs/{job_id:int}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/jobs/{job_id:int}/events", job_events, methods=["GET"]),
        Route("/v1/jobs/{job_id:int}/result", job_result, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *dashboard_routes(executor),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lambda app: _bind_loop(notifier),
    )
    return TokenGate(app, token)


@contextlib.asynccontextmanager
async def _bind_loop(notifier: Notifier) -> AsyncIterator[None]:
    notifier.loop = asyncio.get_running_loop()  # the loop the streams wait on, for notify() from threads
    yield


async def _stream(
    executor: Executor, notifier: Notifier, job_id: int, after: int | None, attach: bool
) -> AsyncIterator[bytes]:
    if attach:
        executor.attach(job_id)
    try:
        last = after
        while True:
            armed = notifier.arm(job_id)
            rows = executor.store.events(job_id, last)
            for event_id, kind, data in rows:
                yield f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()
                last = event_id
                if kind == "finished":
                    return
            if len(rows) == 500:
                continue  # a long backlog: keep reading before waiting
            if not await notifier.wait(armed, KEEPALIVE_S):
                yield b": keepalive\n\n"
    finally:
        if attach:
            executor.detach(job_id)


@contextlib.contextmanager
def _importable_from(directory: str) -> Iterator[None]:
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


def _job_or_404(executor: Executor, request: Request) -> dict[str, Any]:
    job_id = request.path_params["job_id"]
    try:
        return executor.job(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"the request body is over this server's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the request body is over this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await _body(request, MAX_JSON_BYTES)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def _job_request(body: dict[str, Any]) -> tuple[str, list[str], str, str | None, int, bool]:
    unknown = set(body) - {"command", "args", "cwd", "name", "restarts", "attach"}
    if unknown:
        raise HTTPException(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    command = body.get("command")
    if command not in _COMMANDS:
        raise HTTPException(400, f"command must be one of {', '.join(_COMMANDS)}, not {command!r}")
    args = body.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or len(args) > 1000:
        raise HTTPException(400, "args must be a list of strings (the command line after the command)")
    cwd = body.get("cwd")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise HTTPException(400, "cwd must be the client's absolute working directory")
    if not os.path.isdir(cwd):
        raise HTTPException(
            400, f"cwd {cwd!r} is not a directory on the server's host (jobs run where they read their files)"
        )
    restarts = body.get("restarts", 0)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or not 0 <= restarts <= 100:
        raise HTTPException(400, "restarts must be an integer from 0 to 100")
    attach = body.get("attach", False)
    if not isinstance(attach, bool):
        raise HTTPException(400, "attach must be true or false")
    return command, args, cwd, _name(body.get("name")), restarts, attach


def _name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise HTTPException(400, "name must be a string of at most 200 characters")
    return value


def _int(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HTTPException(400, f"{what} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise HTTPException(400, f"{what} must be from {low} to {high}")
    return value


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = {400: "bad_input", 401: "unauthorized", 404: "not_found", 409: "conflict", 413: "too_large"}
    return JSONResponse(
        {"error": kind.get(exc.status_code, "error"), "message": exc.detail}, status_code=exc.status_code
    )


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "internal", "message": f"{type(exc).__name__}: {exc}"}, status_code=500)
