"""``RemoteRunner``: the pool of a ``lightdist serve`` process, as ``PoolStrategy``'s launcher calls it.

``PoolStrategy(server=URL)`` runs its Trainer calls on a server's warm ranks instead of a pool of
its own. The launcher does not change: it calls :meth:`RemoteRunner.invoke_interruptible` as it
would call ``DistributedRunner.invoke_interruptible``, and applies the reply to the Trainer and
model in the same way. In between, over the server's HTTP API (``docs/server.md``):

1. the payload is encoded with the client's own modules by value (:mod:`lightdist._byvalue`) and
   posted to ``POST /v1/calls``: the call is a job, queued behind the server's other jobs;
2. ``GET /v1/jobs/{id}/events?attach=1`` is followed: each Trainer event goes to ``on_item`` (the
   progress bar, ``on_event`` listeners), and the attached stream tells the server the client is
   still there (a client that disappears gets its job cancelled);
3. Ctrl-C posts ``/cancel`` once and keeps following: the ranks stop at a batch they agree on and
   the state so far comes back, as with a local pool; a second Ctrl-C leaves at once;
4. at ``finished``, ``GET /v1/jobs/{id}/result`` brings the reply, or the job's error is raised as
   the ``WorkerError`` / ``WorkerDiedError`` a local pool would have raised.

Nothing connects before it is needed: the first use (the Trainer checking its layout against the
server's, or the first call) attaches, i.e. finds the server and its token and asks
``GET /v1/server``; :attr:`RemoteRunner.attach_s` says how long that took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lightdist.errors import PayloadError
from lightdist.lightning._remote_call import (
    RemoteCallError,
    call_header,
    decode_result,
    encode_call,
    error_from_record,
    error_record,
    execute_call,
)

# The server's side of a call is in _remote_call; the server's job thread imports it from here.
__all__ = ["RemoteRunner", "call_header", "error_record", "execute_call"]

# Events of the server's own about a job (not the Trainer's): never handed to on_item. The
# Trainer's end ("run_end") is not either: the launcher publishes its own, as for a local pool.
_NOT_TRAINER_EVENTS = frozenset({"queued", "started", "log", "interrupted", "finished", "run_end"})


class RemoteRunner:
    """The warm pool of a lightdist server, called like a local ``DistributedRunner``.

    Example::

        strategy = PoolStrategy(server="http://127.0.0.1:8765")   # or server="auto": this host's
        trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=2)
        trainer.fit(model, datamodule=dm)   # runs on the server's ranks; results land here

    Args:
        server: the server's URL (``?token=...`` allowed), or ``"auto"`` for the one running from
            this host's default state directory.
        token: the server's token; default: the URL's ``?token=``, else the state directory's
            token file (readable on the server's host).
        timeout: seconds each request may take (an event stream is kept alive by the server, so a
            silent one means a dead server).
    """

    def __init__(self, server: str = "auto", token: str | None = None, timeout: float = 10.0) -> None:
        self.url = server
        self.timeout = timeout
        self._token = token
        self._lock = threading.Lock()
        self._local = threading.local()  # one Client per thread: a Client is one connection
        self._server: Any = None
        self._info: dict[str, Any] | None = None
        self.attach_s: float | None = None

    def __repr__(self) -> str:
        return f"RemoteRunner({self.url!r})"  # never the token

    # --- the server's layout --------------------------------------------------------------------
    def attach(self) -> dict[str, Any]:
        """Find the server, authenticate and return ``GET /v1/server`` (once; later calls return
        what the first one learned). Raises ``ServerGone`` when nothing answers at the address."""
        with self._lock:
            if self._info is None:
                from lightdist.server._client import find_server

                started = time.perf_counter()
                self._server = find_server(None if self.url == "auto" else self.url, token=self._token)
                info = self._client().info()
                self.attach_s = time.perf_counter() - started
                self._info = info
            return self._info

    @property
    def world_size(self) -> int:
        """The number of ranks the server's pool runs."""
        return int(self.attach()["world_size"])

    @property
    def accelerator(self) -> str:
        """``"cpu"`` or ``"cuda"``: what the server's ranks run on."""
        return str(self.attach()["accelerator"])

    @property
    def nodes(self) -> int:
        """Hosts the server's pool spans (1 unless the server says otherwise)."""
        return int(self.attach().get("nodes") or 1)

    def is_alive(self) -> bool:
        """Whether the server answers and its pool is up (``state`` is ``ready``)."""
        from lightdist.server._client import ServerError

        try:
            self.attach()
            return bool(self._client().info()["state"] == "ready")
        except ServerError:
            return False

    # --- calls ----------------------------------------------------------------------------------
    def invoke_interruptible(
        self,
        payload: dict[str, Any],
        on_item: Callable[[Any], None] | None = None,
        resident: bool = False,
    ) -> tuple[Any, bool]:
        """Run the launcher's payload on the server; returns ``(rank 0's reply, interrupted)``.

        Like ``DistributedRunner.invoke_interruptible``: ``on_item`` gets each Trainer event of
        rank 0 in order; the first Ctrl-C asks the ranks to stop and still waits for their reply,
        a second one raises ``KeyboardInterrupt``; a rank's failure raises ``WorkerError`` or
        ``WorkerDiedError``. ``resident`` is implied: the server writes what the call changed back
        into its copy of the model and the reply carries those entries.
        """
        try:
            blob = encode_call(payload)
        except Exception as exc:
            raise PayloadError(f"the payload cannot be serialized for the server: {exc}") from exc
        self.attach()
        client = self._client()
        try:
            header = call_header(blob)
            job = client.submit_call(blob, cwd=header.cwd, command=header.command or "fit")
            job_id = int(job["id"])
            del blob
            finished, interrupted = self._follow(client, job_id, on_item)
            return self._outcome(client, job_id, finished, interrupted)
        except BaseException:
            client.close()  # a request cut short leaves its connection unusable for the next call
            raise

    def _follow(self, client: Any, job_id: int, on_item: Callable[[Any], None] | None) -> tuple[dict[str, Any], bool]:
        """Follow the job's events to ``finished``; returns its data and whether Ctrl-C was pressed."""
        from lightdist.server._events import raw_event

        interrupted = False
        last: int | None = None
        while True:
            # A Ctrl-C raised inside the stream ends that generator: resume after the last event seen.
            events = client.events(job_id, after=last, attach=True)
            try:
                for event_id, kind, data in events:
                    last = event_id
                    if kind == "finished":
                        return data, interrupted
                    if kind == "queued" and data.get("position"):
                        rank_zero_info(
                            f"lightdist: the server at {self.url} is busy; this call is queued "
                            f"(position {data['position']})"
                        )
                    if on_item is not None and kind not in _NOT_TRAINER_EVENTS:
                        on_item(raw_event(data))
            except KeyboardInterrupt:
                if interrupted:
                    raise  # the second Ctrl-C: leave; the server cancels the job once we are gone
                interrupted = True
                client.cancel(job_id)
            finally:
                events.close()

    def _outcome(self, client: Any, job_id: int, finished: dict[str, Any], interrupted: bool) -> tuple[Any, bool]:
        from lightdist.server._client import ServerError

        state = finished.get("state")
        if state == "failed":
            error = finished.get("error") or client.job(job_id).get("error") or {}
            raise error_from_record(error)
        if state not in ("succeeded", "cancelled"):
            raise RemoteCallError(
                str(state), f"job {job_id} on {self.url} ended without a result (the server stopped while it ran?)"
            )
        while True:
            try:
                blob = client.result(job_id)
                break
            except KeyboardInterrupt:
                interrupted = True  # the reply is on its way: get it anyway, as a local pool does
            except ServerError as exc:
                if state == "cancelled" and exc.status == 404:
                    return None, True  # cancelled before it started: nothing ran, nothing to apply
                raise
        while True:
            try:
                out, stopped = decode_result(blob)
                return out, interrupted or stopped or state == "cancelled"
            except KeyboardInterrupt:
                interrupted = True

    def _client(self) -> Any:
        from lightdist.server._client import Client

        client = getattr(self._local, "client", None)
        if client is None or client.server != self._server:
            client = Client(self._server, timeout=self.timeout)
            self._local.client = client
        return client
