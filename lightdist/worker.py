"""``DistributedWorker`` (what users subclass) and the main loop of one rank process.

A rank runs two threads. The **main thread** runs the user's ``setup``, ``__call__`` and ``teardown``
(Lightning installs signal handlers, which only the main thread may do). The **link thread** owns the
rank's ZMQ socket: it sends everything other threads queue (stream items, results, errors) in queue
order, and reads the driver's messages even while ``__call__`` is busy, so CANCEL and PING are seen
at once. Nothing is ever sent from the main thread directly (ZMQ sockets are single-threaded).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import queue
import sys
import threading
import traceback
import warnings
from typing import TYPE_CHECKING, Any

import zmq

from lightdist import protocol
from lightdist.protocol import Kind, Message, Session
from lightdist.transport import Channel

if TYPE_CHECKING:
    import torch

__all__ = ["DistributedWorker", "rank_main"]

_PR_SET_PDEATHSIG = 1
_FINAL_LINGER_MS = 2000  # the last FAILED/EXIT reply must reach the driver before the socket closes


class DistributedWorker:
    """Base class for the code that runs on every rank of a pool.

    Override ``setup`` (load models once), ``__call__`` (one request) and optionally ``teardown``.
    Every rank runs each call; only rank 0's return value and stream items reach the caller::

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
        self._link: _Link | None = None
        self._warned_nonzero_stream = -1

    # --- what users override ---------------------------------------------------------------------
    def setup(self, **kwargs: Any) -> None:
        """Called once per rank when the pool starts, with the keyword arguments of ``start()``."""

    def __call__(self, streaming: bool = False, **kwargs: Any) -> Any:
        """Called on every rank for each ``invoke``/``stream``; rank 0's return value is the result."""
        return {}

    def teardown(self) -> None:
        """Called once per rank when the pool stops."""

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

        Long ``__call__`` bodies should poll it and return early; ranks that don't stop are
        recovered by the pool after a grace period.
        """
        return self._link is not None and self._link.cancel_event.is_set()

    def add_streaming_result(self, result: Any, image_format: str = "jpeg", as_text_event: bool = False) -> None:
        """Send ``result`` to the caller of ``stream()`` now, in order, without loss.

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
        link.send(Kind.STREAM_ITEM, call, [protocol.dumps((result, image_format))])

    def rank_print(self, message: str, debug: bool = False) -> None:
        """Print ``message`` on this rank; the driver shows it prefixed with ``[rank N]``."""
        print(f"[debug] {message}" if debug else message, flush=True)

    # --- pool internals --------------------------------------------------------------------------
    def _attach(self, link: _Link, local_rank: int, local_world_size: int, device: torch.device) -> None:
        self._link = link
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self._device = device


class _Link:
    """The rank's side of the channel.

    Any thread sends directly (the channel serialises sends, so items and the result leave in the
    order they were made). The link thread only receives: it sets ``cancel_event`` and answers PING
    at once, even while ``__call__`` is busy, and queues CALL/EXIT for the main thread.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.inbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self.cancel_event = threading.Event()
        self.current_call = 0
        self.streaming = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lightdist-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, kind: Kind, call: int = 0, payload: list[bytes] | None = None) -> None:
        """Sign and send now; any thread."""
        self.channel.send(kind, call, payload or ())

    def begin_call(self, call: int, streaming: bool) -> None:
        self.cancel_event.clear()
        self.streaming = streaming
        self.current_call = call

    def end_call(self) -> None:
        self.current_call = 0

    def close(self) -> None:
        """Stop receiving and close the socket, with a short linger so the last reply leaves."""
        self._stopping = True
        self.channel.waker.wake()
        self._thread.join(timeout=10)
        self.channel.close(linger_ms=_FINAL_LINGER_MS)

    def _run(self) -> None:
        try:
            while not self._stopping:
                for _, msg in self.channel.drain():
                    self._handle(msg)
                self.channel.wait(None)
        except (zmq.ZMQError, OSError, ValueError):
            self.inbox.put(None)  # the socket is gone: unblock the main thread

    def _handle(self, msg: Message) -> None:
        kind = msg.kind
        if kind is Kind.CANCEL:
            if msg.header.call == self.current_call:
                self.cancel_event.set()
        elif kind is Kind.PING:
            self.channel.send(Kind.PONG, msg.header.call)
        elif kind in (Kind.CALL, Kind.EXIT):
            self.inbox.put(msg)


def error_report(exc: BaseException) -> bytes:
    """An exception as plain data: the driver can always read it, whatever classes it has."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    return protocol.dumps({"exc_type": name, "message": str(exc), "traceback": tb})


# --- the rank process ------------------------------------------------------------------------------


def rank_main(boot: dict[str, Any], template_pid: int) -> int:
    """Entry point of a forked rank; returns the process exit code."""
    _die_with_parent(template_pid)
    _apply_environment(boot)
    context = zmq.Context()
    session = Session(boot["key"], sender=boot["sender"], rank=boot["rank"])
    session.accept_from(boot["driver_sender"], after_seq=boot["driver_seq"])
    channel = Channel.connect_dealer(context, boot["address"], boot["sender"].encode(), session)
    link = _Link(channel)
    link.start()
    try:
        worker = _build_worker(boot, link)
    except BaseException as exc:  # noqa: BLE001 - every setup failure is reported with its traceback
        link.send(Kind.FAILED, 0, [error_report(exc)])
        link.close()
        context.term()
        return 1
    link.send(Kind.READY)
    code = _serve(worker, link)
    link.close()
    context.term()
    return code


def _die_with_parent(template_pid: int) -> None:
    # PDEATHSIG fires when the template (our parent, single-threaded) exits; the ppid check closes
    # the race where it died before the prctl.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, 9)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != template_pid:
        os._exit(1)


def _apply_environment(boot: dict[str, Any]) -> None:
    os.environ.update(
        RANK=str(boot["rank"]),
        WORLD_SIZE=str(boot["world_size"]),
        LOCAL_RANK=str(boot["local_rank"]),
        LOCAL_WORLD_SIZE=str(boot["local_world_size"]),
    )
    if boot.get("cwd"):
        os.chdir(boot["cwd"])
    _prepend_sys_path(boot.get("sys_path", []))


def _prepend_sys_path(paths: list[str]) -> None:
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


def _build_worker(boot: dict[str, Any], link: _Link) -> DistributedWorker:
    import torch
    import torch.distributed as dist

    device = _pick_device(boot)
    if device.type == "cpu":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // boot["local_world_size"]))
    else:
        torch.cuda.set_device(device)
    backend = boot["backend"] or ("nccl" if device.type == "cuda" else "gloo")
    store = dist.TCPStore(
        boot["store_host"], boot["store_port"], is_master=False,
        timeout=datetime.timedelta(seconds=boot["start_timeout"]),
    )  # fmt: skip
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(boot["store_prefix"], store),
        rank=boot["rank"],
        world_size=boot["world_size"],
        timeout=datetime.timedelta(seconds=boot["pg_timeout"]),
    )
    worker_cls = protocol.loads(boot["worker_cls"])
    kwargs = protocol.loads(boot["setup_kwargs"])
    worker = worker_cls(boot["rank"], boot["world_size"])
    if not isinstance(worker, DistributedWorker):
        raise TypeError(f"{worker_cls!r} must subclass lightdist.DistributedWorker")
    worker._attach(link, boot["local_rank"], boot["local_world_size"], device)
    worker.setup(**kwargs)
    return worker


def _pick_device(boot: dict[str, Any]) -> torch.device:
    import torch

    want = boot["accelerator"]
    has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > boot["local_rank"]
    if want == "cuda" and not has_cuda:
        raise RuntimeError(
            f"accelerator='cuda' but rank {boot['rank']} sees {torch.cuda.device_count()} GPU(s); "
            "use accelerator='cpu' or a smaller world_size"
        )
    if want == "cuda" or (want == "auto" and has_cuda):
        return torch.device("cuda", boot["local_rank"])
    return torch.device("cpu")


def _serve(worker: DistributedWorker, link: _Link) -> int:
    """Run calls until EXIT; every call ends in exactly one RESULT or ERROR reply."""
    while True:
        msg = link.inbox.get()
        if msg is None:  # the link broke: nobody to reply to
            return 1
        if msg.kind is Kind.EXIT:
            break
        _run_call(worker, link, msg)
    code = 0
    try:
        worker.teardown()
    except BaseException:  # noqa: BLE001 - report and still exit
        traceback.print_exc()
        code = 1
    _destroy_process_group()
    link.send(Kind.EXIT)
    return code


def _run_call(worker: DistributedWorker, link: _Link, msg: Message) -> None:
    call_id = msg.header.call
    try:
        call = protocol.loads(msg.payload[0])
        link.begin_call(call_id, call["streaming"])
        _prepend_sys_path(call["sys_path"])
        if call["cwd"] and call["cwd"] != os.getcwd():
            os.chdir(call["cwd"])
        value = worker(streaming=call["streaming"], **call["payload"])
        reply = [_dump_result(value)] if worker.rank == 0 else []
    except BaseException as exc:  # noqa: BLE001 - the rank keeps serving; the caller gets the error
        link.end_call()
        link.send(Kind.ERROR, call_id, [error_report(exc)])
        return
    link.end_call()
    link.send(Kind.RESULT, call_id, reply)


def _dump_result(value: Any) -> bytes:
    try:
        return protocol.dumps(value)
    except Exception as exc:
        raise TypeError(
            f"the return value of __call__ ({type(value).__qualname__}) cannot be pickled: {exc}; "
            "return plain data, tensors or arrays"
        ) from exc


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
