"""``DistributedRunner``: the driver-side handle on a warm pool of ranks.

The API is ``fal.distributed``'s (same names, parameters and defaults) plus blocking twins
(``start_sync``, ``invoke_sync``, ``stream_sync``, ``stop_sync``, ``with runner:``). Both families sit
on the same thread-based core (:mod:`lightdist._pool`), which never depends on the caller's event
loop: the async methods await it from any loop, the blocking ones work in plain scripts and inside a
running loop (a notebook cell, a server thread) alike.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import math
import os
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightdist import _tensors, protocol
from lightdist._attach import HOST_TIMEOUT_S, REHOST_TIMEOUT_S
from lightdist._calls import ERROR, ITEM, RESULT, Event, PendingCall, Reply, encode_call
from lightdist._devices import choose_device, driver_visible_gpus
from lightdist._messages import driver_sys_path
from lightdist._pool import Pool, PoolConfig, PoolStats
from lightdist._state import PoolState
from lightdist.errors import PayloadError, PoolClosedError, TextEventError
from lightdist.transport import deadline_after, remaining
from lightdist.worker import DistributedWorker

__all__ = ["DistributedRunner"]

_live_runners: weakref.WeakSet[DistributedRunner] = weakref.WeakSet()
DEFAULT_TCP_FRAME_CAP = 256 << 20  # frames on a TCP channel without CURVE (see max_frame_bytes)


class DistributedRunner:
    """Starts ``world_size`` ranks of ``worker_cls`` once and runs any number of calls on them.

    Example::

        runner = DistributedRunner(MyWorker, world_size=2)
        await runner.start(model_path="...")          # every rank runs setup(model_path=...)
        out = await runner.invoke({"prompt": "hi"})   # every rank runs __call__; rank 0's value
        async for item in runner.stream({"prompt": "hi"}):
            ...                                        # rank 0's add_streaming_result items, then the result
        await runner.stop()

    Args:
        worker_cls: a :class:`DistributedWorker` subclass; it travels by value, so classes defined in
            ``__main__``, a notebook cell or a function work.
        world_size: number of ranks (one per GPU on a GPU machine).
        master_addr: address the rendezvous store listens on.
        master_port: its port; None picks a free one (no fixed ports).
        worker_addr: address of the command socket when ``worker_port`` is given.
        worker_port: TCP port for the command socket; None uses a private ``ipc://`` socket.
        timeout: the process group's collective timeout, in seconds.
        keepalive_payload: what ``invoke`` sends after ``keepalive_interval`` idle seconds.
        keepalive_interval: idle seconds before a keepalive call; None disables it.
        cwd: working directory of the ranks; None follows the driver's at each call.
        set_device: deprecated and ignored, as in ``fal.distributed``.
        accelerator: ``"auto"`` (a GPU per rank if every local rank can have one, else CPU for all),
            ``"cuda"`` (an error if there are fewer GPUs than local ranks) or ``"cpu"``.
        backend: torch.distributed backend; None picks NCCL on GPU and gloo on CPU.
        preload: modules the template imports before forking ranks (torch always); e.g.
            ``("lightning",)`` so every rank starts with Lightning already imported.
        grace_period: seconds a rank gets to finish a call that failed on another rank (it sees
            ``cancelled``), or a cancelled call that another rank already left; then it is killed
            and replaced. A call that was only cancelled is never cut short (see docs/failures.md).
        nodes: a pool across hosts: wait for this many ``lightdist agent`` processes (one per host)
            to attach, then give each a contiguous range of ``world_size`` ranks. Needs ``listen``
            and ``key_file``; see docs/multinode.md. ``host_names`` instead waits for those hosts
            (agents' ``--host-name``), in that order, and a start that times out names the missing.
        listen: ``tcp://ADDR:PORT`` the driver listens on for agents and their ranks (port 0: any
            free port, read it back from :attr:`address`); the rendezvous store listens on ADDR too.
        host_timeout: seconds without a heartbeat after which an attached host is lost (2 s). The
            driver pings 4 times per timeout from a Python thread and agents give up on a silent
            driver after 1.5 times it; raise it if the driver can hold the GIL for seconds (e.g.
            unpickling a very large result).
        rehost_timeout: seconds the ranks of a lost host wait for another host (a spare, or an
            agent started after the loss) to take them (120 s). Calls wait meanwhile; after it they
            fail at once with a ``RuntimeError`` naming the lost host and what to start, until an
            agent attaches (the pool then resumes) or ``start()`` is called again.
        key_file: the driver's key file (``lightdist keys create DIR`` makes one): the HMAC key and
            the CURVE server keys with the allow-list of client keys.
        tensor_transport: how the tensors in payloads and results travel (never inside the pickle).
            ``"auto"``: through shared memory between the processes of one host (ranks share one
            copy of tensors they do not train), as signed ZMQ frames across hosts; ``"frames"``:
            always as frames. See docs/architecture.md, "Tensors".
        max_frame_bytes: the largest frame the driver's command socket accepts; a peer that sends a
            larger one is disconnected before its bytes are read, and a rank whose result or stream
            item would exceed it gets an error instead. None: 256 MiB on a TCP channel without CURVE
            (``worker_port`` without ``key_file``: anyone who can reach the port can send), no limit
            on the private ipc socket or with CURVE (peers must authenticate before sending).
            Tensors never count: they travel out of band on one host.
        stream_buffer_items, stream_buffer_bytes: how much of a stream the caller may leave unread
            (1024 items, 64 MiB). Past that, rank 0's ``add_streaming_result`` waits until the
            caller reads on, so a slow consumer (an SSE client on a slow link) slows the producer
            instead of filling the driver's memory; no item is ever dropped.
    """

    def __init__(
        self,
        worker_cls: type[DistributedWorker] = DistributedWorker,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        worker_addr: str = "127.0.0.1",
        worker_port: int | None = None,
        timeout: int = 86400,
        keepalive_payload: dict[str, Any] = {},  # noqa: B006 - the seed API's default, never mutated
        keepalive_interval: int | float | None = None,
        cwd: str | Path | None = None,
        set_device: bool | None = None,
        *,
        accelerator: str = "auto",
        backend: str | None = None,
        preload: tuple[str, ...] = (),
        grace_period: float = 2.0,
        nodes: int | None = None,
        host_names: Sequence[str] | None = None,
        listen: str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        host_timeout: float = HOST_TIMEOUT_S,
        rehost_timeout: float = REHOST_TIMEOUT_S,
        tensor_transport: str = "auto",
        max_frame_bytes: int | None = None,
        stream_buffer_items: int = 1024,
        stream_buffer_bytes: int = 64 << 20,
    ) -> None:
        _check_worker_cls(worker_cls)
        _check_world_size(world_size)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if keepalive_interval is not None and (
            not isinstance(keepalive_interval, (int, float)) or keepalive_interval <= 0
        ):
            raise ValueError(f"keepalive_interval must be a positive number or None, got {keepalive_interval!r}")
        if not isinstance(keepalive_payload, Mapping):
            raise TypeError(f"keepalive_payload must be a dict, got {type(keepalive_payload).__name__}")
        _check_payload_keys(keepalive_payload)  # sent like invoke's: refused here, not on every rank later
        if not isinstance(grace_period, (int, float)) or grace_period < 0:
            raise ValueError(f"grace_period must be a number of seconds >= 0, got {grace_period!r}")
        if accelerator not in ("auto", "cpu", "cuda"):
            raise ValueError(f"accelerator must be 'auto', 'cpu' or 'cuda', got {accelerator!r}")
        if host_names is not None:
            host_names = _check_host_names(host_names, nodes)
            nodes = len(host_names)
        if nodes is not None:
            _check_attach(nodes, listen, key_file, world_size)
        if isinstance(host_timeout, bool) or not isinstance(host_timeout, (int, float)) or host_timeout < 0.2:
            raise ValueError(f"host_timeout must be a number of seconds >= 0.2, got {host_timeout!r}")
        if isinstance(rehost_timeout, bool) or not isinstance(rehost_timeout, (int, float)) or rehost_timeout < 0:
            raise ValueError(f"rehost_timeout must be a number of seconds >= 0, got {rehost_timeout!r}")
        if max_frame_bytes is not None and (isinstance(max_frame_bytes, bool) or not isinstance(max_frame_bytes, int)
                                            or max_frame_bytes < 1 << 16):  # fmt: skip
            raise ValueError(f"max_frame_bytes must be an int of at least 65536, got {max_frame_bytes!r}")
        for name, value in (("stream_buffer_items", stream_buffer_items), ("stream_buffer_bytes", stream_buffer_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if tensor_transport not in ("auto", "frames"):
            raise ValueError(f"tensor_transport must be 'auto' or 'frames', got {tensor_transport!r}")
        if set_device is not None:
            warnings.warn("set_device is deprecated and ignored", DeprecationWarning, stacklevel=2)
        self.worker_cls = worker_cls
        self.world_size = world_size
        self.master_addr = master_addr
        self.master_port = master_port
        self.worker_addr = worker_addr
        self.worker_port = worker_port
        self.timeout = timeout
        self.keepalive_payload = dict(keepalive_payload)
        self.keepalive_interval = keepalive_interval
        # Absolute: the template starts in it and each rank chdirs to it again.
        self.cwd = os.path.abspath(cwd) if cwd is not None else None
        self.accelerator = accelerator
        self.backend = backend
        self.preload = tuple(preload)
        self.grace_period = float(grace_period)
        self.nodes = nodes
        self.host_names = host_names
        self.host_timeout = float(host_timeout)
        self.rehost_timeout = float(rehost_timeout)
        self.listen = listen
        self.key_file = key_file
        self.tensor_transport = tensor_transport
        self.max_frame_bytes = max_frame_bytes
        self.stream_window = (stream_buffer_items, stream_buffer_bytes)
        self._pool: Pool | None = None
        self._lifecycle = threading.Lock()  # start/stop never overlap

    # --- state -----------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        """True while the pool is started and serving (also while it recovers from a lost rank)."""
        return self._pool is not None and self._pool.is_alive()

    def idle_seconds(self) -> float | None:
        """Seconds this pool has run nothing (keepalives count as calls); None while a call runs or
        is queued, or while the pool starts or recovers; ``inf`` when it is not started, stopped or
        broken (nothing of it is in use)."""
        pool = self._pool
        if pool is None or pool.state.over:
            return math.inf
        return pool.idle_seconds()

    def transfer_stats(self) -> dict[str, int]:
        """Counters of what crossed between this driver and its ranks since ``start()``: ``calls``,
        ``tensor_bytes_sent`` / ``tensors_sent`` (storages sent with calls, each counted once however
        many ranks received it), ``tensors_resident`` (storages the ranks already held, sent as a
        reference), ``pickle_bytes_sent``, ``tensor_bytes_received`` / ``tensors_received``."""
        pool = self._pool
        return dict(vars(pool.transfers)) if pool is not None else {}

    def stats(self) -> PoolStats:
        """A snapshot of the pool: state, address, store port, template and rank pids, hosts,
        recoveries so far, calls sent and queued.

        Raises:
            PoolClosedError: before ``start()`` or after ``stop()``.
        """
        pool = self._pool
        if pool is None:
            raise PoolClosedError(f"{self!r}: no pool to describe; call start() first")
        return pool.stats()

    @property
    def pids(self) -> dict[int, int]:
        """``{rank: pid}`` of the live rank processes."""
        return self._pool.rank_pids() if self._pool is not None else {}

    def __repr__(self) -> str:
        state = self._pool.state.value if self._pool is not None else "not started"
        return f"DistributedRunner({self.worker_cls.__qualname__}, world_size={self.world_size}, {state})"

    # --- start -----------------------------------------------------------------------------------
    async def start(self, timeout: int | float = 1800, **kwargs: Any) -> None:
        """Start every rank and run ``setup(**kwargs)`` on each; all-or-nothing.

        Raises:
            RuntimeError: the pool is already running.
            WorkerError: ``setup`` raised on a rank (its traceback is attached); nothing is left running.
            WorkerDiedError: a rank process died during start.
            TimeoutError: not every rank was ready within ``timeout`` seconds.
        """
        deadline = deadline_after(timeout)
        launch = asyncio.ensure_future(asyncio.to_thread(self._launch, kwargs, timeout))
        try:
            pool = await asyncio.shield(launch)
        except asyncio.CancelledError:
            # The launch thread cannot be interrupted: reap whatever it starts once it is done.
            launch.add_done_callback(self._abort_launched)
            raise
        try:
            while not pool.startup_event(await pool.startup.anext(deadline)):
                pass
        except BaseException as exc:
            await asyncio.to_thread(self._abort_start, pool)
            raise pool.start_error(exc, timeout) from None
        pool.mark_ready()

    def start_sync(self, timeout: int | float = 1800, **kwargs: Any) -> None:
        """Blocking twin of :meth:`start`."""
        deadline = deadline_after(timeout)
        pool = self._launch(kwargs, timeout)
        try:
            while not pool.startup_event(pool.startup.next(deadline)):
                pass
        except BaseException as exc:
            self._abort_start(pool)
            raise pool.start_error(exc, timeout) from None
        pool.mark_ready()

    def _launch(self, kwargs: dict[str, Any], timeout: float) -> Pool:
        self._warn_if_gpus_unused()
        with self._lifecycle:
            if self._pool is not None:
                if self._pool.state in (PoolState.STARTING, PoolState.READY, PoolState.RECOVERING):
                    raise RuntimeError(f"{self!r} is already running; stop() it first")
                self._pool.kill()  # a broken pool: reap what is left before replacing it
                self._pool = None
            config = PoolConfig(
                world_size=self.world_size,
                worker_cls=_dumps_or_raise(self.worker_cls, "worker_cls"),
                setup_kwargs=_dumps_kwargs(kwargs, "start() keyword argument"),
                imports=("torch", *self.preload),
                cwd=self.cwd,
                sys_path=tuple(driver_sys_path()),
                pg_timeout=float(self.timeout),
                accelerator=self.accelerator,
                backend=self.backend,
                master_addr=self._listen_host() or self.master_addr,
                master_port=self.master_port,
                worker_address=self._worker_address(),
                keepalive_payload=self.keepalive_payload,
                keepalive_interval=self.keepalive_interval,
                grace_period=self.grace_period,
                nodes=self.nodes,
                host_names=None if self.host_names is None else tuple(self.host_names),
                host_timeout=self.host_timeout,
                rehost_timeout=self.rehost_timeout,
                curve=self._driver_keys(),
                tensor_transport=self.tensor_transport,
                max_frame_bytes=self._frame_cap(),
                stream_window=self.stream_window,
            )
            pool = Pool(config)
            self._pool = pool
            _live_runners.add(self)
            try:
                pool.launch(float(timeout))
            except BaseException:
                pool.kill()
                self._pool = None
                raise
            return pool

    def _warn_if_gpus_unused(self) -> None:
        # Said here, in the caller's process, before any rank starts; a pool across hosts has
        # other hosts' GPUs, which only their ranks can count (they warn too, as [rank N] lines).
        if self.accelerator != "auto" or self.nodes is not None:
            return
        gpus = driver_visible_gpus()
        if gpus is not None:
            _, warning = choose_device(gpus, self.world_size, self.accelerator)
            if warning is not None:
                warnings.warn(warning, stacklevel=4)

    def _frame_cap(self) -> int | None:
        """The command socket's frame limit; warns about a TCP channel that anyone can write to."""
        if self.max_frame_bytes is not None:
            return self.max_frame_bytes
        address = self._worker_address()
        if address is None or self.key_file is not None:
            return None  # ipc in a 0700 directory, or CURVE: only authenticated peers send
        warnings.warn(
            f"the pool's command channel {address} runs without CURVE: anyone who can reach it can send "
            "frames (each capped at max_frame_bytes) before the HMAC check drops them; pass key_file= "
            "(lightdist keys create DIR) to require authentication, or drop worker_port to use a private "
            "ipc socket",
            RuntimeWarning,
            stacklevel=4,
        )
        return DEFAULT_TCP_FRAME_CAP

    def _worker_address(self) -> str | None:
        if self.listen is not None:
            return self.listen
        return None if self.worker_port is None else f"tcp://{self.worker_addr}:{self.worker_port}"

    def _listen_host(self) -> str | None:
        return None if self.listen is None else self.listen.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")

    def _driver_keys(self) -> Any:
        if self.key_file is None:
            return None
        from lightdist.keys import load_driver_keys

        return load_driver_keys(self.key_file)

    @property
    def hosts(self) -> dict[str, list[int]]:
        """``{host name: ranks}``: ``{"local": [...]}`` on one machine; each agent's host across hosts."""
        return self._pool.host_ranks() if self._pool is not None else {}

    @property
    def address(self) -> str | None:
        """The address ranks (and agents) connect to: ``tcp://...`` or ``ipc://...``.

        Known from construction when ``listen`` (or ``worker_port``) names a port, so the command
        for the other hosts can be printed before ``start()`` blocks; with port 0, or a private
        ``ipc://`` socket, it is None until ``start()`` has bound the socket (``start()`` of a pool
        across hosts then says the address while it waits for the agents)."""
        if self._pool is not None:
            return self._pool.address
        address = self._worker_address()
        return None if address is None or address.rsplit(":", 1)[-1] in ("0", "*") else address

    def _abort_launched(self, launch: asyncio.Future[Pool]) -> None:
        if not launch.cancelled() and launch.exception() is None:
            threading.Thread(target=self._abort_start, args=(launch.result(),), name="lightdist-abort").start()

    def _abort_start(self, pool: Pool) -> None:
        with self._lifecycle:
            pool.kill()
            if self._pool is pool:
                self._pool = None

    # --- calls -----------------------------------------------------------------------------------
    async def invoke(self, payload: dict[str, Any] = {}, timeout: int | float | None = None) -> Any:  # noqa: B006
        """Run ``__call__(streaming=False, **payload)`` on every rank; return rank 0's value.

        Raises:
            WorkerError: a rank raised (the first to do so; its traceback is attached).
            WorkerDiedError: a rank process died.
            TimeoutError: no result within ``timeout`` seconds; the call is cancelled on every rank.
        """
        pool, call = self._submit(payload, streaming=False)
        deadline = deadline_after(timeout)
        try:
            while True:
                event = await call.anext(deadline)
                if event.kind in (RESULT, ERROR):
                    return _final_value(event, pool)
        except TimeoutError:
            pool.cancel(call)
            raise TimeoutError(f"invoke() got no result within {timeout} s; the call was cancelled") from None
        except BaseException:
            pool.cancel(call)
            raise

    def invoke_sync(self, payload: dict[str, Any] = {}, timeout: int | float | None = None) -> Any:  # noqa: B006
        """Blocking twin of :meth:`invoke`; Ctrl-C cancels the call on every rank."""
        pool, call = self._submit(payload, streaming=False)
        deadline = deadline_after(timeout)
        try:
            while True:
                event = pool.wait_event(call, deadline)
                if event.kind in (RESULT, ERROR):
                    return _final_value(event, pool)
        except TimeoutError:
            pool.cancel(call)
            raise TimeoutError(f"invoke() got no result within {timeout} s; the call was cancelled") from None
        except BaseException:
            pool.cancel(call)
            raise

    def invoke_interruptible(
        self,
        payload: dict[str, Any] = {},  # noqa: B006
        on_item: Callable[[Any], None] | None = None,
        resident: bool = False,
    ) -> tuple[Any, bool]:
        """Like :meth:`invoke_sync`, but Ctrl-C asks the ranks to stop and still waits for their reply.

        Returns ``(value, interrupted)``. Worker code that polls ``cancelled`` can return what it has
        (the Lightning layer returns the state of a fit stopped at a batch all ranks agreed on).
        With ``on_item`` the call streams (``streaming=True``) and each item of rank 0 is passed to
        it as it arrives, in order. Ranks that do not return within ``grace_period`` of the first
        Ctrl-C are replaced
        and ``TimeoutError`` is raised; a second Ctrl-C abandons the call (KeyboardInterrupt).

        With ``resident`` the payload's tensors stay on the ranks after the call, and later resident
        calls that carry the same unchanged tensors send only a reference; what rank 0 changes in
        them is written back into the caller's tensors (see ``lightdist._resident``).
        """
        pool, call = self._submit(payload, streaming=on_item is not None, resident=resident)
        interrupted = False
        final: Event | None = None
        while final is None:
            # Ctrl-C may land anywhere in here, in on_item too (drawing a progress bar takes a good
            # share of the main thread's time): every spot must turn it into the same interrupt.
            try:
                event = pool.wait_event(call, None, lead=False)  # the I/O thread receives: see wait_event
                if event.kind == ITEM and on_item is not None:
                    on_item(protocol.loads(event.value)[0])
                elif event.kind in (RESULT, ERROR):
                    final = event
            except KeyboardInterrupt:
                if interrupted:
                    pool.cancel(call)
                    raise
                interrupted = True
                pool.interrupt(call)
        while True:
            try:
                return _final_value(final, pool), interrupted
            except KeyboardInterrupt:  # while unpickling the result: it is still here, try again
                interrupted = True

    def interrupt(self, force: bool = False) -> bool:
        """Ask the call running now to stop, as Ctrl-C in its caller would; safe from any thread.

        The ranks see ``cancelled`` and the caller still gets the call's reply (an interrupted
        Lightning fit returns its state so far). Nobody is replaced for being slow: a rank gets
        ``grace_period`` only once another rank has left the call (it would wait for it in a
        collective forever). ``force``: replace ranks still inside ``grace_period`` from now, as
        a second request to stop deserves. Returns whether a call was running. A server cancels a
        job this way while the job's own thread waits in :meth:`invoke_interruptible`."""
        pool = self._pool
        call = pool.current if pool is not None else None
        if pool is None or call is None:
            return False
        pool.interrupt(call, patient=not force)
        return True

    async def stream(
        self,
        payload: dict[str, Any] = {},  # noqa: B006
        timeout: int | float | None = None,
        streaming_timeout: int | float | None = None,
        as_text_events: bool = False,
    ) -> AsyncIterator[Any]:
        """Run ``__call__(streaming=True, **payload)``; yield rank 0's items in order, then the result.

        Every ``add_streaming_result`` item of rank 0 is yielded, none dropped, however slowly the
        consumer reads. With ``as_text_events`` each item is ``bytes`` of ``data: <json>\\n\\n``.
        Leaving the loop early cancels the call on every rank.

        Raises:
            WorkerError / WorkerDiedError: as for :meth:`invoke`.
            TimeoutError: ``timeout`` passed, or ``streaming_timeout`` seconds without an item.
            TextEventError: an item has no JSON form (the pool keeps serving).
        """
        pool, call = self._submit(payload, streaming=True)
        reader = _StreamReader(pool, call, timeout, streaming_timeout, as_text_events, payload)
        try:
            while True:
                event = await call.anext(reader.deadline())
                value, last = reader.decode(event)
                yield value
                if last:
                    return
        except TimeoutError:
            reader.raise_timeout()
        finally:
            if not call.finished.is_set():
                pool.cancel(call)

    def stream_sync(
        self,
        payload: dict[str, Any] = {},  # noqa: B006
        timeout: int | float | None = None,
        streaming_timeout: int | float | None = None,
        as_text_events: bool = False,
    ) -> Iterator[Any]:
        """Blocking twin of :meth:`stream` (a plain iterator)."""
        pool, call = self._submit(payload, streaming=True)
        reader = _StreamReader(pool, call, timeout, streaming_timeout, as_text_events, payload)
        try:
            while True:
                value, last = reader.decode(pool.wait_event(call, reader.deadline()))
                yield value
                if last:
                    return
        except TimeoutError:
            reader.raise_timeout()
        finally:
            if not call.finished.is_set():
                pool.cancel(call)

    def _submit(self, payload: Mapping[str, Any], streaming: bool, resident: bool = False) -> tuple[Pool, PendingCall]:
        if not isinstance(payload, Mapping):
            raise TypeError(f"payload must be a dict of __call__ keyword arguments, got {type(payload).__name__}")
        _check_payload_keys(payload)
        pool = self._pool
        if pool is None:
            raise PoolClosedError(f"{self!r}: call start() before invoke()/stream()")
        keys = pool.resident if resident else None
        # Encoding and queueing under one lock: resident calls reach the ranks in the order their
        # keys were planned (see lightdist._resident).
        with keys.lock if keys is not None else contextlib.nullcontext():
            try:
                frames, outbound = encode_call(payload, streaming, self.cwd, pool.transports, keys)
            except Exception as exc:
                _dumps_kwargs(payload, "payload key")  # raises, naming the culprit
                raise PayloadError(f"the payload cannot be serialized for the workers: {exc}") from exc
            serial = keys.serial if keys is not None else None
            return pool, pool.submit(frames, streaming, outbound=outbound, resident_serial=serial)

    # --- stop ------------------------------------------------------------------------------------
    async def stop(self, timeout: int | float = 10) -> None:
        """Stop every rank: EXIT (runs ``teardown``) → ``timeout`` → SIGTERM → SIGKILL. Idempotent."""
        await asyncio.to_thread(self.stop_sync, timeout)

    def stop_sync(self, timeout: int | float = 10) -> None:
        """Blocking twin of :meth:`stop`; safe to call twice and at interpreter exit."""
        with self._lifecycle:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.close(timeout)
            _live_runners.discard(self)

    async def __aenter__(self) -> DistributedRunner:
        if not self.is_alive():
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> DistributedRunner:
        if not self.is_alive():  # not started, or broken: (re)start
            self.start_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_sync()


class _StreamReader:
    """Deadlines and decoding shared by ``stream`` and ``stream_sync``."""

    def __init__(
        self,
        pool: Pool,
        call: PendingCall,
        timeout: float | None,
        streaming_timeout: float | None,
        as_text_events: bool,
        payload: Mapping[str, Any],
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.streaming_timeout = streaming_timeout
        self.as_text_events = as_text_events
        self.image_format = str(payload.get("image_format", "jpeg"))
        self._total = deadline_after(timeout)
        self._gap: float | None = None
        self._items = 0

    def deadline(self) -> float | None:
        self._gap = deadline_after(self.streaming_timeout)
        if self._total is None or self._gap is None:
            return self._total if self._gap is None else self._gap
        return min(self._total, self._gap)

    def decode(self, event: Event) -> tuple[Any, bool]:
        if event.kind == ITEM:
            value, image_format = protocol.loads(event.value)
            self._items += 1
            return self._encode(value, image_format, f"stream item {self._items}"), False
        return self._encode(_final_value(event, self.pool), self.image_format, "the final result"), True

    def _encode(self, value: Any, image_format: str, what: str) -> Any:
        if not self.as_text_events:
            return value
        try:
            return protocol.encode_text_event(value, image_format)
        except TextEventError as exc:
            raise TextEventError(f"{what} cannot be sent as a text event: {exc}") from None

    def raise_timeout(self) -> None:
        if self._total is not None and remaining(self._total) == 0:
            raise TimeoutError(f"stream() did not finish within {self.timeout} s; the call was cancelled") from None
        raise TimeoutError(
            f"stream() got no item for {self.streaming_timeout} s (streaming_timeout); the call was cancelled"
        ) from None


def _check_payload_keys(payload: Mapping[str, Any]) -> None:
    """Refuse, in the caller, keys that ``__call__(streaming=..., **payload)`` could not take.

    On the ranks they would fail every rank with a ``TypeError`` far from the call that caused it.
    On the hot path: one pass over the keys, the message is built only for a bad one.
    """
    if not all(isinstance(key, str) for key in payload):
        bad = next(key for key in payload if not isinstance(key, str))
        raise TypeError(f"payload keys are __call__ keyword names and must be str, got {bad!r} ({type(bad).__name__})")
    if "streaming" in payload:
        raise ValueError("'streaming' is set by the runner (invoke: False, stream: True); remove it from payload")
    if "self" in payload:
        raise ValueError("'self' cannot be a payload key: it is __call__'s own first parameter; rename it")


def _final_value(event: Event, pool: Pool) -> Any:
    if event.kind == ERROR:
        # A broken pool hands the same cause to every later call: raise a fresh copy each time
        # so tracebacks don't pile up on one shared object.
        raise copy.copy(event.value).with_traceback(None)
    reply: Reply | None = event.value
    if reply is None:
        return None
    if reply.buffers:  # frames transport: check every tensor frame against its signed digest first
        protocol.verify_bulk(reply.digests, reply.buffers)
    value, writeback = _tensors.decode(reply.data, reply.manifest, reply.buffers, ready=reply.ready)
    if reply.manifest.get("transport") == _tensors.FRAMES:
        records = [r for r in reply.manifest["records"] if r[0] == _tensors.FRAME]
        pool.transfers.received(sum(r[2] for r in records), len(records))
    if reply.resident_serial is not None:
        keys = pool.resident
        with keys.lock:
            # Rank 0's changes land in the driver's own tensors; then the ranks and the driver agree.
            refused = keys.apply(reply.resident_serial, writeback)
            keys.commit(reply.resident_serial, set(reply.dropped) | set(refused))
    return value


def _check_host_names(host_names: Sequence[str], nodes: int | None) -> list[str]:
    names = [host_names] if isinstance(host_names, str) else list(host_names)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"host_names must be distinct, non-empty host names, got {host_names!r}")
    if nodes is not None and nodes != len(names):
        raise ValueError(f"nodes={nodes} but {len(names)} host_names were given; give one or the other")
    return names


def _check_attach(nodes: Any, listen: str | None, key_file: Any, world_size: int) -> None:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int (the number of hosts to wait for), got {nodes!r}")
    if listen is None or not listen.startswith("tcp://") or ":" not in listen[6:]:
        raise ValueError(f"a pool across hosts needs listen='tcp://ADDR:PORT' (the driver's address), got {listen!r}")
    if key_file is None:
        raise ValueError("a pool across hosts needs key_file= (create one with: lightdist keys create DIR)")
    if world_size % nodes:
        raise ValueError(
            f"world_size {world_size} is not a multiple of nodes {nodes}: each host runs the same number of ranks"
        )


def _check_worker_cls(worker_cls: Any) -> None:
    if not (isinstance(worker_cls, type) and issubclass(worker_cls, DistributedWorker)):
        raise TypeError(f"worker_cls must be a subclass of lightdist.DistributedWorker, got {worker_cls!r}")


def _check_world_size(world_size: Any) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int (one rank per GPU on a GPU machine), got {world_size!r}")


def _dumps_or_raise(obj: Any, what: str) -> bytes:
    try:
        return protocol.dumps(obj)
    except Exception as exc:
        raise TypeError(f"{what} cannot be serialized for the workers: {exc}") from exc


def _dumps_kwargs(kwargs: Mapping[str, Any], what: str) -> bytes:
    for key, value in kwargs.items():
        try:
            protocol.dumps(value)
        except Exception as exc:
            raise PayloadError(
                f"{what} {key!r} ({type(value).__qualname__}) cannot be serialized for the workers: {exc}"
            ) from exc
    return protocol.dumps(dict(kwargs))


@atexit.register
def _stop_all_at_exit() -> None:
    for runner in list(_live_runners):
        try:
            runner.stop_sync(timeout=2)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
