"""The server's job queue: jobs run one at a time, in the order they arrived, on the one warm pool.

One thread (``lightdist-server-jobs``) takes the oldest queued job, runs it in the client's working
directory and writes its events; a watchdog thread cancels jobs whose client went away. Every state
change goes to the :class:`~lightdist.server._store.JobStore` first, so a restarted server knows
what was queued (it runs them) and what was running (marked ``interrupted``, requeued when the job
asked for restarts).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lightdist.server._events import StepCounter, api_event
from lightdist.server._store import TERMINAL_STATES, JobStore

__all__ = ["ATTACH_GRACE_S", "Executor", "JobConflict", "JobNotFound"]

# How long an attached job survives without its client's event stream: long enough to reconnect
# after a dropped connection, short enough that a killed client frees the pool at once.
ATTACH_GRACE_S = 3.0
# Results of Python-client calls wait this long for their client to fetch them.
RESULT_TTL_S = 600.0
_SHUTDOWN = "the server is shutting down"
# Queued command lines that keep their parse from submission; the rest are parsed when they run.
MAX_PREPARED = 4


class JobNotFound(KeyError):
    pass


class JobConflict(Exception):
    """The request does not fit the job's state (e.g. cancelling a finished job)."""


@dataclass
class _Live:
    """What the server holds in memory about a job that has not finished."""

    id: int
    attached: bool
    owners: int = 0
    alone_since: float | None = None
    cancel: str | None = None  # why cancellation was asked for, once it was
    blob: bytes | None = None  # a Python-client call's pickled Trainer call, until it runs
    prepared: Any = None  # a command line's parse from its validation (see _cli_job.Prepared)
    # The running job's last step and metrics, for job lists (the dashboard's progress column)
    # without reading its events back: replaced, never appended to.
    progress: dict[str, Any] | None = None


class Executor:
    """Queue, run and cancel jobs; ``notify(job_id)`` is called (from any thread) after each event."""

    def __init__(
        self,
        store: JobStore,
        pool: Any,
        layout: Any,
        notify: Callable[[int], None],
        ready: threading.Event,
    ) -> None:
        self.store = store
        self.pool = pool  # .interrupt() the call in flight; .runner the started DistributedRunner
        self.layout = layout
        self.notify = notify
        self.ready = ready  # set once the pool has started: jobs wait for it
        self._lock = threading.Condition()
        self._queue: deque[int] = deque()
        self._live: dict[int, _Live] = {}
        self._call_results: dict[int, tuple[float, bytes]] = {}
        self._running: int | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # --- lifecycle --------------------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: a job that was running is interrupted (requeued if it asked for restarts);
        queued CLI jobs run again in their order; queued calls cannot (their client is gone)."""
        for job_id in self.store.ids_in_state("running"):
            self._interrupted(job_id)
        for job_id in self.store.ids_in_state("queued"):
            job = self.store.job(job_id)
            assert job is not None
            if job["kind"] == "call":
                self._finish(job_id, "interrupted", exit_code=1, error=_interrupted_error())
            else:
                self._queue.append(job_id)
                self._live[job_id] = _Live(job_id, attached=False)

    def _interrupted(self, job_id: int) -> None:
        """The server stopped while ``job_id`` ran: requeue it to resume from its last checkpoint
        when it asked for restarts (it runs when a server starts again), else it ends ``interrupted``."""
        job = self.store.job(job_id)
        assert job is not None
        resumes = job["kind"] == "cli" and job["attempt"] <= job["restarts"]
        self.event(job_id, "interrupted", {"attempt": job["attempt"], "resumes": resumes})
        if resumes:
            self.store.update(job_id, state="queued", args=_resume_args(job["command"], job["args"]))
        else:
            self._finish(job_id, "interrupted", exit_code=1, error=_interrupted_error())

    def start(self) -> None:
        for name, target in (("jobs", self._loop), ("watchdog", self._watch)):
            thread = threading.Thread(target=target, name=f"lightdist-server-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; ask the running one to stop and wait for it (it ends ``interrupted``)."""
        with self._lock:
            self._stopping = True
            running = self._running
            if running is not None:
                self._live[running].cancel = _SHUTDOWN
            self._lock.notify_all()
        if running is not None:
            self.pool.interrupt(force=True)  # stopping: ranks still in a step after the grace are replaced
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- requests ---------------------------------------------------------------------------------
    def submit(
        self,
        *,
        kind: str,
        command: str,
        args: list[str],
        cwd: str,
        name: str | None,
        restarts: int = 0,
        attach: bool = False,
        blob: bytes | None = None,
        prepared: Any = None,
    ) -> dict[str, Any]:
        with self._lock:
            if self._stopping:
                raise JobConflict("the server is shutting down")
            job = self.store.add_job(name=name, kind=kind, command=command, args=args, cwd=cwd, restarts=restarts)
            if sum(live.prepared is not None for live in self._live.values()) >= MAX_PREPARED:
                prepared = None  # a parse holds a parser (MBs): a long queue parses again when its turn comes
            live = _Live(
                job["id"],
                attached=attach,
                blob=blob,
                prepared=prepared,
                alone_since=time.monotonic() if attach else None,
            )
            self._live[job["id"]] = live
            self._queue.append(job["id"])
            position = len(self._queue)
            self._lock.notify_all()
        self.event(job["id"], "queued", {"position": position})
        return self.describe(job)

    def cancel(self, job_id: int, reason: str = "cancelled by a client") -> dict[str, Any]:
        with self._lock:
            live = self._live.get(job_id)
            if live is None:
                job = self.job(job_id)  # raises JobNotFound
                raise JobConflict(f"job {job_id} already finished ({job['state']})")
            again = live.cancel is not None
            if not again:
                live.cancel = reason
            queued = job_id in self._queue
            if queued:
                self._queue.remove(job_id)
        if queued:
            self._finish(job_id, "cancelled", exit_code=130, error=None)
        else:
            # The first cancel waits for the ranks to reach a batch they agree on, however long a
            # step takes; a second one replaces ranks still inside after the grace period.
            # No call in flight yet: the job's first event asks again.
            self.pool.interrupt(force=again)
        return self.job(job_id)

    def attach(self, job_id: int) -> None:
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                live.owners += 1
                live.attached = True
                live.alone_since = None

    def detach(self, job_id: int) -> None:
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                live.owners -= 1
                if live.owners == 0:
                    live.alone_since = time.monotonic()

    def job(self, job_id: int) -> dict[str, Any]:
        job = self.store.job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return self.describe(job)

    def jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        return [self.describe(job) for job in self.store.jobs(state, limit)]

    def describe(self, job: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            position = self._queue.index(job["id"]) + 1 if job["id"] in self._queue else None
            live = self._live.get(job["id"])
            progress = live.progress if live is not None else None
        return {**job, "position": position, "progress": progress}

    def status(self) -> tuple[int, int | None]:
        with self._lock:
            return len(self._queue), self._running

    def take_result(self, job_id: int) -> bytes | None:
        with self._lock:
            entry = self._call_results.pop(job_id, None)
        return None if entry is None else entry[1]

    def event(self, job_id: int, kind: str, fields: dict[str, Any]) -> None:
        self.store.add_event(job_id, kind, fields)
        self.notify(job_id)

    # --- the job thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._queue and self.ready.is_set()):
                    self._lock.wait(0.5)
                if self._stopping:
                    return
                job_id = self._queue.popleft()
                self._running = job_id
                live = self._live[job_id]
            try:
                self._run(job_id, live)
            finally:
                with self._lock:
                    self._running = None
                    self._live.pop(job_id, None)

    def _run(self, job_id: int, live: _Live) -> None:
        job = self.store.job(job_id)
        assert job is not None
        attempt = job["attempt"] + 1
        self.store.update(job_id, state="running", started_at=time.time(), attempt=attempt)
        self.event(
            job_id, "started", {"command": job["command"], "attempt": attempt, "world_size": self.layout.world_size}
        )
        steps = StepCounter()

        def on_raw(raw: dict[str, Any]) -> None:
            if live.cancel is not None:
                self.pool.interrupt()  # asked before the call reached the ranks
            kind, fields = api_event(raw)
            total = steps.see(raw)
            if kind == "train_batch":
                fields["total_steps"] = total
            if kind in ("train_batch", "validation"):
                live.progress = _progress(live.progress, fields)
            self.event(job_id, kind, fields)

        try:
            with _job_context(job["cwd"]):
                if job["kind"] == "call":
                    outcome = self._run_call(live, on_raw)
                else:
                    outcome = self._run_cli(job, on_raw, live)
        except BaseException as exc:  # noqa: BLE001 - a bug in the server's own code fails the job, not the server
            from lightdist.server._cli_job import JobOutcome, _error_dict

            outcome = JobOutcome()
            outcome.exit_code = 1
            outcome.error = _error_dict(exc, None)
        if live.cancel == _SHUTDOWN:
            self.store.update(job_id, metrics=outcome.metrics, artifacts=outcome.artifacts)
            self._interrupted(job_id)
            return
        state, exit_code = outcome.state, outcome.exit_code
        if live.cancel is not None:
            # Asked to stop, and stopped: after its last step, at a batch, or with its ranks replaced
            # after a second cancel (the error, if any, stays on the job).
            state, exit_code = "cancelled", 130
        self._finish(job_id, state, exit_code, outcome.error, outcome.metrics, outcome.artifacts)

    def _run_cli(self, job: dict[str, Any], on_raw: Callable[[dict[str, Any]], None], live: _Live) -> Any:
        from lightdist.server._cli_job import run_cli_job

        def on_trainer(trainer: Any) -> None:
            trainer.strategy.hub.listeners.append(on_raw)

        return run_cli_job(
            job["command"],
            job["args"],
            self.layout,
            lambda kind, fields: self.event(job["id"], kind, fields),
            on_trainer,
            resumed=job["attempt"] > 0,  # attempts before this one (read before it started)
            prepared=live.prepared,
        )

    def _run_call(self, live: _Live, on_raw: Callable[[dict[str, Any]], None]) -> Any:
        from lightdist.lightning._remote import error_record, execute_call
        from lightdist.server._cli_job import JobOutcome

        blob, live.blob = live.blob, None
        outcome = JobOutcome()
        try:
            result, interrupted = execute_call(blob or b"", self.pool.runner, on_raw)
        except Exception as exc:  # noqa: BLE001 - the client re-raises it from the job's error
            outcome.exit_code = 1
            # What the client needs to raise the same WorkerError / WorkerDiedError a local pool would.
            outcome.error = error_record(exc)
            return outcome
        if interrupted:
            outcome.exit_code = 130
        with self._lock:
            self._call_results[live.id] = (time.monotonic(), result)
        return outcome

    def _finish(
        self,
        job_id: int,
        state: str,
        exit_code: int,
        error: dict[str, Any] | None,
        metrics: dict[str, float] | None = None,
        artifacts: dict[str, str] | None = None,
    ) -> None:
        assert state in TERMINAL_STATES
        fields = {"metrics": metrics or {}, "artifacts": artifacts or {}}
        self.store.update(job_id, state=state, finished_at=time.time(), exit_code=exit_code, error=error, **fields)
        self.event(job_id, "finished", {"state": state, "exit_code": exit_code, "error": error, **fields})

    # --- the watchdog -----------------------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._lock.wait(0.25)
                now = time.monotonic()
                orphans = [
                    live.id
                    for live in self._live.values()
                    if live.attached
                    and live.owners == 0
                    and live.cancel is None
                    and live.alone_since is not None
                    and now - live.alone_since > ATTACH_GRACE_S
                ]
                expired = [k for k, (at, _) in self._call_results.items() if now - at > RESULT_TTL_S]
                for key in expired:
                    del self._call_results[key]
            for job_id in orphans:
                with contextlib.suppress(JobConflict, JobNotFound):
                    self.cancel(job_id, reason="its client went away")


@contextlib.contextmanager
def _job_context(cwd: str) -> Iterator[None]:
    """Run a job as a fresh command would: in the client's directory, with its modules importable,
    and leave no trace for the next job (environment, ``sys.path``, torch's global flags)."""
    import torch

    saved_cwd, saved_env, saved_path = os.getcwd(), dict(os.environ), list(sys.path)
    saved_flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.get_float32_matmul_precision(),
        torch.get_default_dtype(),
    )
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # `lightdist fit --model mymod.Reg` finds ./mymod.py, as `python -m` would
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        torch.use_deterministic_algorithms(saved_flags[0], warn_only=saved_flags[1])
        torch.backends.cudnn.benchmark = saved_flags[2]
        torch.set_float32_matmul_precision(saved_flags[3])
        torch.set_default_dtype(saved_flags[4])


def _resume_args(command: str, args: list[str]) -> list[str]:
    """The job's command line, resuming from its last checkpoint (``--ckpt_path=last``)."""
    if command != "fit":
        return args
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return [*kept, "--ckpt_path=last"]


def _progress(previous: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
    """A job's progress after a ``train_batch`` or ``validation`` event: step, total, epoch, and
    the latest value of every metric seen so far (validation metrics stay until the next one)."""
    before = previous or {}
    return {
        "step": fields.get("step", before.get("step")),
        "total_steps": fields.get("total_steps", before.get("total_steps")),
        "epoch": fields.get("epoch", before.get("epoch")),
        "metrics": {**before.get("metrics", {}), **fields.get("metrics", {})},
    }


def _interrupted_error() -> dict[str, Any]:
    return {
        "type": "ServerRestart",
        "message": "the server stopped while this job was running or queued",
        "traceback": None,
        "rank": None,
    }
