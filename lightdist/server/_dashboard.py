"""The dashboard's routes: two pages, their static files, and the two API calls only they need.

The pages are static HTML: everything they show comes from the JSON API and the event streams,
written into the page with ``textContent`` (never parsed as markup), so job names, metric names and
tracebacks are data wherever they come from. Scripts, styles and the chart code ship in
``lightdist/server/static`` (no network at run time, no build step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from lightdist.server._jobs import Executor, JobNotFound

__all__ = ["STATIC_DIR", "dashboard_routes"]

STATIC_DIR = Path(__file__).parent / "static"
# Artifacts that are single files (the others are directories: shown as paths, not served).
FILE_ARTIFACTS = ("last_checkpoint", "best_checkpoint", "predictions_file")
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag): a server upgrade shows its new pages at once


def dashboard_routes(executor: Executor) -> list[BaseRoute]:
    async def jobs_page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=_NO_CACHE)

    async def job_page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "job.html", headers=_NO_CACHE)

    async def configs(request: Request) -> JSONResponse:
        return JSONResponse({"configs": await run_in_threadpool(_shipped_configs)})

    async def artifact(request: Request) -> Response:
        job_id, name = request.path_params["job_id"], request.path_params["name"]
        try:
            job = await run_in_threadpool(executor.job, job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None
        # Only a path the job itself reported, and only a file: this is not a file browser.
        path = job["artifacts"].get(name) if name in FILE_ARTIFACTS else None
        if not path or not Path(path).is_file():
            raise HTTPException(404, f"job {job_id} has no file artifact {name!r}")
        return FileResponse(path, filename=Path(path).name)

    return [
        Route("/", jobs_page, methods=["GET"]),
        Route("/jobs/{job_id:int}", job_page, methods=["GET"]),
        Route("/v1/configs", configs, methods=["GET"]),
        Route("/v1/jobs/{job_id:int}/artifacts/{name}", artifact, methods=["GET"]),
        Mount("/static", _Static(directory=STATIC_DIR), name="static"),
    ]


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_NO_CACHE)
        return response


def _shipped_configs() -> list[dict[str, str]]:
    """The shipped configs (``lightdist recipes``), as the submit form offers them."""
    from lightdist.cli._catalog import find_configs

    out = []
    for config in find_configs():
        words = config.command.split()
        command = words[1] if len(words) > 1 and words[1] in ("fit", "validate", "test", "predict") else "fit"
        out.append({"name": config.name, "command": command, "description": config.description})
    return out
