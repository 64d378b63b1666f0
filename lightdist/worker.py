"""``DistributedWorker``: what users subclass to run code on every rank of a pool.

A rank runs two threads. The **main thread** runs the user's ``setup``, ``__call__`` and ``teardown``
(Lightning installs signal handlers, which only the main thread may do); the **link thread**
receives while a call runs, so ``cancelled`` turns true at once. The process side lives in
:mod:`lightdist._rank` and :mod:`lightdist._link`.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lightdist import protocol
from lightdist.protocol import Kind

if TYPE_CHECKING:
    import torch

    from lightdist._link import Link
    from lightdist._resident import RankCache

__all__ = ["DistributedWorker"]


class DistributedWorker:
    """Base class for the code that runs on every rank of a pool.

    Override ``setup`` (load models once), ``__call__`` (one request) and optionally ``teardown``.
    Every rank runs each call; only rank 0's return value and stream items reach the caller.
    ``setup``, ``__call__``, ``teardown`` and ``on_process_group_rebuilt`` may be ``async def``: they
    are awaited on one event loop per rank, kept for the life of the rank, so objects bound to it (an
    ``aiohttp`` session made in ``setup``) stay usable in every call::

        class Doubler(DistributedWorker):
            def setup(self, factor: int = 2) -> None:
                self.factor = factor

            def __call__(self, x: int, streaming: bool = False) -> int:
                if streaming and self.rank == 0:
                    self.add_streaming_result({"progress": 0.5})
                return x * self.factor

    Attributes set by the pool before ``setup`` runs: ``rank``, ``world_size``, ``local_rank``,
    ``local_world_size``, ``device``. ``torch.distributed`` is already initialised (NCCL when the
    rank owns a GPU, gloo otherwise).
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank
        self.local_world_size = world_size
        self._device: torch.device | None = None
        self._link: Link | None = None
        self._resident: RankCache | None = None  # set while a resident call runs (see lightdist._resident)
        self._warned_nonzero_stream = -1
        self._thread_calls: weakref.WeakKeyDictionary[threading.Thread, int] = weakref.WeakKeyDictionary()
        self._loop: asyncio.AbstractEventLoop | None = None  # made by the first async hook

    # --- what users override ---------------------------------------------------------------------
    if TYPE_CHECKING:
        # Each subclass picks its own keyword arguments (``def setup(self, model_path: str)``):
        # typed as open callables so such overrides type-check, sync or ``async def``.
        setup: Callable[..., Awaitable[None] | None]
        __call__: Callable[..., Any]
    else:

        def setup(self, **kwargs: Any) -> None:
            """Called once per rank when the pool starts, with the keyword arguments of ``start()``."""

        def __call__(self, streaming: bool = False, **kwargs: Any) -> Any:
            """Called on every rank for each ``invoke``/``stream``; rank 0's return value is the result."""
            return {}

    def teardown(self) -> Awaitable[None] | None:
        """Called once per rank when the pool stops (may be ``async def``)."""

    def on_process_group_rebuilt(self) -> Awaitable[None] | None:
        """Called on a surviving rank after the pool rebuilt the process group (another rank died or
        got stuck and was replaced). ``setup`` state is kept; re-create here anything bound to the
        old group, e.g. a ``DistributedDataParallel`` wrapper made in ``setup``."""

    # --- what users call -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` when this rank owns a GPU, else ``cpu``."""
        if self._device is None:
            import torch

            self._device = torch.device("cpu")
        return self._device

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the running call (timeout, task cancel, Ctrl-C).

        Long ``__call__`` bodies should poll it and return early; a rank still running the call
        ``grace_period`` seconds after the cancel is killed and replaced (its ``setup`` runs again).
        """
        return self._link is not None and self._link.cancel_event.is_set()

    def add_streaming_result(self, result: Any, image_format: str = "jpeg", as_text_event: bool = False) -> None:
        """Send ``result`` to the caller of ``stream()`` now, in order, without loss.

        Blocks while the caller has ``stream_buffer_items`` items or ``stream_buffer_bytes`` bytes
        of this call unread (runner settings), so a slow consumer slows the producer instead of
        filling the driver's memory; returns at once, sending nothing, once the call is cancelled.

        Safe from any thread of this rank while a call runs. Only rank 0's items reach the caller;
        on other ranks the item is ignored (with a one-time warning per call). ``image_format`` is used
        for PIL images when the caller asked for text events. ``as_text_event`` is accepted for
        compatibility with ``fal.distributed``: the caller's ``stream(as_text_events=...)`` decides
        the format, so worker code never has to match it.
        """
        link = self._link
        call = link.current_call if link is not None else 0
        if link is None or call == 0:
            raise RuntimeError(
                "add_streaming_result() was called outside a running call; call it from __call__ "
                "(or a thread it started) before __call__ returns"
            )
        if self.rank != 0:
            if self._warned_nonzero_stream != call:
                self._warned_nonzero_stream = call
                warnings.warn(
                    f"add_streaming_result() on rank {self.rank} is ignored: only rank 0's stream "
                    "items reach the caller (guard it with `if self.rank == 0`)",
                    stacklevel=2,
                )
            return
        if not link.streaming:
            return  # invoke() returns only the final value: nothing would read the item
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            # A thread that streamed in an earlier call and outlived it must not slip its items
            # into this one (the main thread always runs the current call).
            first = self._thread_calls.setdefault(thread, call)
            if first != call:
                raise RuntimeError(
                    f"thread {thread.name!r} streamed in an earlier call and is still running; "
                    "join threads that call add_streaming_result() before __call__ returns"
                )
        try:
            data = protocol.dumps((result, image_format))
        except Exception as exc:
            raise TypeError(
                f"stream item ({type(result).__qualname__}) cannot be pickled: {exc}; "
                "stream plain data, tensors, arrays or PIL images"
            ) from exc
        # Backpressure: wait while the caller has too much unread (see _link.StreamWindow).
        if link.window.reserve(len(data), link.cancel_event) and link.current_call == call:
            link.send(Kind.STREAM_ITEM, call, [data])

    def rank_print(self, message: str, debug: bool = False) -> None:
        """Print ``message`` on this rank; the driver shows it prefixed with ``[rank N]``."""
        print(f"[debug] {message}" if debug else message, flush=True)

    # --- pool internals --------------------------------------------------------------------------
    def _complete(self, value: Any) -> Any:
        """``value`` itself, or what it gives once awaited when a hook was ``async def``.

        Runs on the rank's main thread, like a sync hook (``cancelled`` is set by the link thread
        meanwhile). The loop is made once and reused, so state bound to it survives between calls.
        """
        if not inspect.isawaitable(value):
            return value
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        # A fresh default executor per hook: ``asyncio.to_thread`` reuses its threads, and a thread
        # that streamed in one call would otherwise be taken for a leftover in the next one.
        executor = ThreadPoolExecutor(thread_name_prefix=f"rank{self.rank}-to_thread")
        self._loop.set_default_executor(executor)
        try:
            return self._loop.run_until_complete(_awaited(value))
        finally:
            executor.shutdown(wait=False)

    def _close_loop(self) -> None:
        """After ``teardown``: finish async generators and close the loop (no-op without one)."""
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _attach(self, link: Link, local_rank: int, local_world_size: int, device: torch.device) -> None:
        self._link = link
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self._device = device


async def _awaited(value: Any) -> Any:
    # run_until_complete takes futures and coroutines; this also admits any other awaitable.
    return await value
