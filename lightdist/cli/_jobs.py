"""``lightdist jobs [ID]``: the jobs of a ``lightdist serve`` server, as a table or one in detail.

::

    lightdist jobs                     # the newest 50 jobs of the local server
    lightdist jobs --state running     # only those (queued, running, succeeded, failed, cancelled, ...)
    lightdist jobs 7                   # one job: state, times, metrics, artifacts, error and traceback
    lightdist jobs 7 --follow          # its progress bar and lines until it ends (Ctrl-C stops following)
    lightdist jobs 7 --cancel          # cancel it (a running job stops at one batch; the ranks stay warm)
    lightdist jobs --server http://HOST:PORT/?token=T --json

Like the thin client (``_remote``), it imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lightdist.cli._remote import follow, open_client, progress_bar_kind, server_problem

__all__ = ["main", "main_metric"]

PROG = "lightdist jobs"


def main(argv: list[str]) -> int:
    """``lightdist jobs`` → exit status (0; 1 when no server answers; with ``--follow``, the job's)."""
    from lightdist.server._client import ServerError

    args = _parser().parse_args(argv)
    if args.id is None and (args.follow or args.cancel):
        print(f"{PROG}: error: --follow and --cancel need a job ID", file=sys.stderr)
        return 2
    try:
        client = open_client(args.server)
        if args.id is None:
            jobs = client.jobs(state=args.state, limit=args.limit)
            print(json.dumps(jobs, indent=2) if args.json else table(jobs))
            return 0
        if args.cancel:
            job = client.cancel(args.id)
            print(
                f"job {job['id']}: {job['state']}"
                + (" (stopping at the next batch)" if job["state"] == "running" else "")
            )
            return 0
        if args.follow:
            bar = progress_bar_kind(list(client.job(args.id).get("args") or []))
            return follow(client, args.id, f"{PROG} {args.id}", owner=False, progress_bar=bar)
        job = client.job(args.id)
        print(json.dumps(job, indent=2) if args.json else detail(job))
        return 0
    except (ServerError, ValueError) as error:
        return server_problem(PROG, error)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The jobs of a lightdist server (lightdist serve).")
    parser.add_argument("id", nargs="?", type=int, help="show this job in detail")
    parser.add_argument(
        "--server", nargs="?", const="auto", default="auto", metavar="URL", help="the server (default: the local one)"
    )
    parser.add_argument("--state", help="only jobs in this state (queued, running, succeeded, failed, cancelled)")
    parser.add_argument("--limit", type=int, default=50, help="at most this many jobs, newest first (default 50)")
    parser.add_argument("--follow", action="store_true", help="draw the job's progress until it ends")
    parser.add_argument("--cancel", action="store_true", help="cancel the job")
    parser.add_argument("--json", action="store_true", help="the server's JSON, as is")
    return parser


def table(jobs: list[dict[str, Any]]) -> str:
    """Jobs as an aligned table, one row each."""
    if not jobs:
        return "no jobs"
    header = ("ID", "NAME", "STATE", "COMMAND", "CONFIG", "ELAPSED", "METRIC")
    rows = [header] + [
        (
            str(job["id"]),
            job.get("name") or "-",
            _state(job),
            str(job.get("command") or job.get("kind") or "-"),
            config_name(job.get("args") or []),
            _duration(_elapsed(job)),
            main_metric(job.get("metrics") or {}),
        )
        for job in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def detail(job: dict[str, Any]) -> str:
    """One job, field by field, with its error's traceback at the end."""
    lines = [f"job {job['id']}" + (f" ({job['name']})" if job.get("name") else "") + f": {_state(job)}"]

    def field(name: str, value: object) -> None:
        lines.append(f"  {name:<10}{value}")

    if job.get("kind", "cli") == "cli":
        field("command", " ".join(["lightdist", str(job.get("command", "")), *map(str, job.get("args") or [])]))
        field("cwd", job.get("cwd"))
    else:
        field("kind", job.get("kind"))
    created, started, finished = job.get("created_at"), job.get("started_at"), job.get("finished_at")
    field("created", _when(created))
    if started is not None:
        field("started", f"{_when(started)} (waited {_duration(started - created) if created else '-'})")
    if finished is not None:
        field("finished", f"{_when(finished)} (ran {_duration(_elapsed(job))})")
    elif started is not None:
        field("running", _duration(_elapsed(job)))
    field("attempt", f"{job.get('attempt', 1)} (restarts allowed: {job.get('restarts', 0)})")
    if job.get("exit_code") is not None:
        field("exit code", job["exit_code"])
    metrics = job.get("metrics") or {}
    if metrics:
        field("metrics", ", ".join(f"{name}={_number(value)}" for name, value in sorted(metrics.items())))
    artifacts = job.get("artifacts") or {}
    if artifacts:
        lines.append("  artifacts")
        width = max(len(name) for name in artifacts) + 2
        lines += [f"    {name:<{width}}{path}" for name, path in sorted(artifacts.items())]
    error = job.get("error")
    if error:
        where = f" (rank {error['rank']})" if error.get("rank") is not None else ""
        field("error", f"{error.get('type', 'Error')}{where}: {error.get('message', '')}")
        if error.get("traceback"):
            lines += ["", str(error["traceback"]).rstrip("\n")]
    return "\n".join(lines)


def config_name(args: list[str]) -> str:
    """The job's ``--config``: a shipped config by its name (``digits/pretrain-cpu``), else the file name."""
    from lightdist.cli._catalog import configs_root

    value = "-"
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
    if value == "-":
        return value
    path, root = Path(value), configs_root()
    if path.is_absolute() and path.resolve().is_relative_to(root):  # also by the checkout's configs/ link
        return str(path.resolve().relative_to(root).with_suffix(""))
    return path.name


def main_metric(metrics: dict[str, float]) -> str:
    """The metric a table shows: validation first, then test, then training; accuracy before loss
    (alphabetical within a stage), so that runs of one config compare on the same column."""
    if not metrics:
        return "-"
    for prefix in ("val", "test", "train", ""):
        names = sorted(name for name in metrics if name.startswith(prefix))
        if names:
            return f"{names[0]}={_number(metrics[names[0]])}"
    return "-"


def _state(job: dict[str, Any]) -> str:
    state = str(job.get("state", "?"))
    if state == "queued" and job.get("position"):
        return f"queued ({job['position']})"
    return state


def _elapsed(job: dict[str, Any]) -> float | None:
    started = job.get("started_at")
    if started is None:
        return None
    return float(job.get("finished_at") or time.time()) - float(started)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
