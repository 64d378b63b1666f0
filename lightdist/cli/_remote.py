"""``lightdist fit|validate|test|predict ... --server [URL]``: run the command as a job on a server.

The thin client: it sends the command line to a ``lightdist serve`` process, which parses it with
the same LightningCLI a local run uses and runs it on its warm pool, and it draws the job's events
as a local run draws them (the same progress bar, the same lines, the same exit status). It imports
neither torch nor Lightning, so it starts in a fraction of a second; see docs/cli.md ("Running on a
server").

Flags, taken out of the command line before it is sent (anywhere after the command)::

    --server [URL]     run on the server at URL; bare (or 'auto'): the local server
    --name NAME        the job's name in 'lightdist jobs'
    --detach           queue the job, print its id and exit 0 (follow it: lightdist jobs ID --follow)
    --restarts N       requeue the job up to N times when the server restarts while it runs

Exit status as a local run (0 ok, 1 a rank failed, 2 bad input, 130 interrupted), and 1 when no
server answers or it went away.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightdist.cli._catalog import resolve_config_args
from lightdist.cli._errors import BAD_INPUT, INTERRUPTED, RANK_FAILED  # light: jsonargparse only on use

if TYPE_CHECKING:
    from lightdist.server._client import Client

__all__ = ["RemoteOptions", "follow", "open_client", "run_remote", "server_problem", "split_remote_args"]

FAILED = RANK_FAILED  # also: no server answers, or it went away while the job ran

_LOCAL_ONLY = ("-h", "--help", "--print_config")  # answered by the parser, on this host


class RemoteArgsError(ValueError):
    """A ``--server``/``--name``/``--detach``/``--restarts`` flag that is malformed or misplaced."""


@dataclass(frozen=True)
class RemoteOptions:
    """The client's own flags, taken out of a trainer command line."""

    server: str | None = None  # a URL, "auto" (the local server), or None: run here
    name: str | None = None
    detach: bool = False
    restarts: int = 0


def split_remote_args(args: list[str]) -> tuple[RemoteOptions, list[str]]:
    """``(the client's flags, the rest)``. ``--server`` takes the next argument as its URL unless it
    is another flag (``--server --config x``: the local server). Raises :class:`RemoteArgsError`.

    Example::

        split_remote_args(["--config", "x.yaml", "--server", "--name", "a"])
        # (RemoteOptions(server="auto", name="a"), ["--config", "x.yaml"])
    """
    found: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, has_value, value = arg.partition("=")
        if flag == "--server":
            if not has_value and i + 1 < len(args) and not args[i + 1].startswith("-"):
                i, value = i + 1, args[i + 1]
            found["server"] = value or "auto"
        elif flag in ("--name", "--restarts"):
            if not has_value:
                if i + 1 >= len(args):
                    raise RemoteArgsError(f"{flag} needs a value")
                i, value = i + 1, args[i + 1]
            found[flag[2:]] = value
        elif arg == "--detach":
            found["detach"] = True
        else:
            rest.append(arg)
        i += 1
    if "server" not in found and found:
        raise RemoteArgsError(f"--{', --'.join(sorted(found))}: only with --server [URL] (a job on a server)")
    try:
        restarts = int(found.get("restarts", 0))
    except ValueError:
        raise RemoteArgsError(f"--restarts: expected a number of restarts, got {found['restarts']!r}") from None
    if restarts < 0:
        raise RemoteArgsError("--restarts: expected 0 or more")
    return RemoteOptions(found.get("server"), found.get("name"), bool(found.get("detach")), restarts), rest


def runs_here(args: list[str]) -> bool:
    """Whether the command only asks the parser something (``--help``, ``--print_config``): that is
    answered on this host, where the config files are, without a job."""
    return any(arg in _LOCAL_ONLY or arg.startswith("--print_config=") for arg in args)


def absolute_config_args(args: list[str]) -> list[str]:
    """``--config`` names and paths made absolute: the server resolves them from this directory too,
    but an absolute path reads the same in ``lightdist jobs`` from anywhere."""
    out = resolve_config_args(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out) and Path(out[i + 1]).exists():
            out[i + 1] = os.path.abspath(out[i + 1])
        elif arg.startswith("--config=") and Path(arg[len("--config=") :]).exists():
            out[i] = "--config=" + os.path.abspath(arg[len("--config=") :])
    return out


def open_client(server: str | None) -> Client:
    """A client of the server named by a ``--server`` value (None or ``auto``: the local one).
    Raises ``ServerGone`` (no local server) or ``ValueError`` (not a URL)."""
    from lightdist.server._client import Client, find_server

    return Client(find_server(server))


def server_problem(prog: str, error: Exception) -> int:
    """Print the one line for a request the server did not serve; returns the exit status.

    ``ServerGone`` (nothing answers) and another ``ServerError`` exit 1; a ``ValueError`` from
    ``find_server`` (``--server`` is not a URL) is bad input, 2.
    """
    from lightdist.server._client import ServerError, ServerGone

    if isinstance(error, ServerGone):
        text = str(error)
        hint = "" if "start one" in text else " (start one with: lightdist serve; or check --server URL)"
        print(f"{prog}: error: {text}{hint}", file=sys.stderr)
        return FAILED
    if isinstance(error, ServerError):
        print(f"{prog}: error: the server answered {error.status}: {error.message}", file=sys.stderr)
        return FAILED
    print(f"{prog}: error: --server: {error}", file=sys.stderr)
    return BAD_INPUT


def run_remote(command: str, options: RemoteOptions, args: list[str]) -> int:
    """Submit ``lightdist COMMAND ARGS`` to the server and follow it; returns the exit status."""
    from lightdist.server._client import BadInput, ServerError

    prog = f"lightdist {command}"
    args = absolute_config_args(args)
    try:
        client = open_client(options.server)
        job = client.submit(
            command,
            args,
            os.getcwd(),
            name=options.name,
            restarts=options.restarts,
            # Owned by this process: when it dies without cancelling, the server cancels the job.
            attach=not options.detach,
        )
    except BadInput as error:  # the server parsed the config: nothing was queued
        print(f"{prog}: error: {error.message} (see: {prog} --help)", file=sys.stderr)
        return BAD_INPUT
    except (ServerError, ValueError) as error:
        return server_problem(prog, error)
    except KeyboardInterrupt:  # if it was queued, it was attached: the server cancels it in 3 s
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    job_id = int(job["id"])
    if options.detach:
        print(job_id)  # stdout holds only the id: JOB=$(lightdist fit ... --server --detach)
        where = f"{prog}: job {job_id} queued on {client.server.url}"
        print(f"{where}; follow it with: lightdist jobs {job_id} --follow", file=sys.stderr)
        return 0
    print(f"{prog}: job {job_id} on {client.server.url} (Ctrl-C cancels it)", file=sys.stderr)
    return follow(client, job_id, prog, owner=True, progress_bar=progress_bar_kind(args))


def follow(client: Client, job_id: int, prog: str, *, owner: bool, progress_bar: str | None) -> int:
    """Draw job ``job_id``'s events until it finishes; returns its exit status.

    ``owner`` (the submitting client): Ctrl-C cancels the job and waits for it to stop (a second
    Ctrl-C stops waiting); otherwise Ctrl-C only stops following.
    """
    from lightdist.server._client import ServerError, ServerGone

    view = _JobView(prog, job_id, progress_bar)
    last: int | None = None
    try:
        while True:
            try:
                for event_id, kind, data in client.events(job_id, after=last, attach=owner):
                    last = event_id
                    status = view.show(kind, data)
                    if status is not None:
                        return status
                raise ServerGone(f"the event stream of job {job_id} ended before the job did")
            except KeyboardInterrupt:
                view.close()
                if not owner or view.cancelled:  # a second Ctrl-C: stop waiting
                    return _stopped_waiting(prog, job_id, client.server.url, owner)
                view.cancelled = True
                # The ranks stop at one batch and the stream goes on to "finished". Should this
                # request not get through, the job is attached: the server cancels it 3 s after
                # this process is gone.
                try:
                    client.cancel(job_id)
                except ServerGone:
                    raise
                except ServerError:
                    pass  # it has just finished (409): its "finished" event says how
                print(f"{prog}: cancelling job {job_id} (Ctrl-C again to stop waiting)", file=sys.stderr)
    except KeyboardInterrupt:  # the second Ctrl-C came while the first one was handled
        return _stopped_waiting(prog, job_id, client.server.url, owner)
    except ServerGone as error:
        view.close()
        print(
            f"{prog}: error: {error}; job {job_id} did not finish here (see: lightdist jobs {job_id})", file=sys.stderr
        )
        return FAILED
    except ServerError as error:
        view.close()
        return server_problem(prog, error)
    finally:
        view.close()


def _stopped_waiting(prog: str, job_id: int, url: str, owner: bool) -> int:
    left = "is being cancelled" if owner else "keeps running"
    print(f"{prog}: interrupted (job {job_id} {left} on {url})", file=sys.stderr)
    return INTERRUPTED


class _JobView:
    """What the terminal shows of one job's events: the lines a local run prints, and its bar."""

    def __init__(self, prog: str, job_id: int, progress_bar: str | None) -> None:
        from lightdist._progress import EventProgressBar

        self.prog = prog
        self.job_id = job_id
        self.cancelled = False  # this client asked for the cancel (Ctrl-C)
        self.drawing = progress_bar is not None
        self.bar = EventProgressBar(rich=progress_bar == "rich")

    def show(self, kind: str, data: dict[str, Any]) -> int | None:
        """Draw one event; the exit status once the job has finished, else None."""
        from lightdist.server._events import raw_event

        if kind == "queued" and (data.get("position") or 0) > 1:
            print(f"{self.prog}: job {self.job_id} waits behind {data['position'] - 1} queued job(s)", file=sys.stderr)
        elif "trainer" in data and self.drawing:  # an event of the Trainer's progress (see lightning/events.py)
            self.bar(raw_event(data))
        elif kind == "run_end":
            self.bar.close()
        elif kind == "interrupted" and data.get("resumes"):  # the server stops; the job is requeued
            self.bar.close()
            back = "resumes from its last checkpoint when the server is back"
            print(f"{self.prog}: the server is stopping; job {self.job_id} {back}", file=sys.stderr)
        elif kind == "log":
            self.bar.write(str(data.get("message", "")))
        elif kind == "finished":
            self.bar.close()
            return self._finished(data)
        return None

    def _finished(self, data: dict[str, Any]) -> int:
        state, code = data.get("state"), data.get("exit_code")
        error = data.get("error") or {}
        message = str(error.get("message") or state)
        if code == 0:
            return 0
        if code == BAD_INPUT:  # a check that could only run once the job ran (e.g. on the ranks)
            print(f"{self.prog}: error: {message} (see: {self.prog} --help)", file=sys.stderr)
            return BAD_INPUT
        if code == INTERRUPTED or state == "cancelled":
            said = "interrupted" if self.cancelled else f"job {self.job_id} was cancelled"
            print(f"{self.prog}: {said}", file=sys.stderr)
            return INTERRUPTED
        if state == "interrupted":
            print(f"{self.prog}: error: the server stopped while job {self.job_id} ran", file=sys.stderr)
            return FAILED
        # A failed rank: the line and the rank's traceback, as a local run prints them.
        print(f"{self.prog}: {message}", file=sys.stderr)
        traceback = str(error.get("traceback") or "")
        if traceback and traceback not in message:
            print(traceback.rstrip("\n"), file=sys.stderr)
        return int(code) if isinstance(code, int) and code > 0 else FAILED

    def close(self) -> None:
        self.bar.close()


def progress_bar_kind(args: list[str]) -> str | None:
    """The bar a local run of ``args`` would draw: ``"rich"``, ``"tqdm"`` or None (disabled).

    The server does not say (it parses the config, the client does not): read the same signals
    from the config files and the command line. Lightning's default is rich when rich is installed.
    """
    import importlib.util

    default = "rich" if importlib.util.find_spec("rich") is not None else "tqdm"
    kind: str | None = default
    for i, arg in enumerate(args):
        value = None
        if arg == "--config" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            kind = _bar_in_config(Path(value), kind)
        flag, has_value, setting = arg.partition("=")
        if flag.startswith("--trainer.callbacks"):  # --trainer.callbacks+=lightning...TQDMProgressBar
            setting = setting if has_value else (args[i + 1] if i + 1 < len(args) else "")
            kind = _bar_class(setting, kind)
        elif flag == "--trainer.enable_progress_bar":
            setting = setting if has_value else (args[i + 1] if i + 1 < len(args) else "true")
            if setting.lower() in ("false", "0", "no"):
                kind = None
            elif kind is None:
                kind = default
    return kind


def _bar_in_config(path: Path, kind: str | None) -> str | None:
    try:
        import yaml  # jsonargparse's dependency; light
    except ImportError:
        return kind
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return kind  # the server reports a config it cannot read
    trainer = body.get("trainer") if isinstance(body, dict) else None
    if not isinstance(trainer, dict):
        return kind
    if trainer.get("enable_progress_bar") is False:
        return None
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        kind = _bar_class(str(callback.get("class_path", "") if isinstance(callback, dict) else callback), kind)
    return kind


def _bar_class(class_path: str, kind: str | None) -> str | None:
    if class_path.endswith("RichProgressBar"):
        return "rich"
    if class_path.endswith("TQDMProgressBar"):
        return "tqdm"
    return kind
