"""``DistributedWorker`` (what users subclass) and the main loop of one rank process.

A rank runs two threads. The **main thread** runs the user's ``setup``, ``__call__`` and ``teardown``
(Lightning installs signal handlers, which only the main thread may do) and, between calls, receives
the next CALL itself. The **link thread** receives while a call runs, so CANCEL and PING are seen at
once even while ``__call__`` is busy. Any thread sends (results, stream items) directly: the channel
serialises sends, so they leave in the order they were made.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import pickle
import queue
import select
import sys
import threading
import traceback
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import zmq

from lightdist import protocol
from lightdist.protocol import Kind, Message, Session
from lightdist.transport import Channel, Waker

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
        self._thread_calls: weakref.WeakKeyDictionary[threading.Thread, int] = weakref.WeakKeyDictionary()

    # --- what users override ---------------------------------------------------------------------
    def setup(self, **kwargs: Any) -> None:
        """Called once per rank when the pool starts, with the keyword arguments of ``start()``."""

    def __call__(self, streaming: bool = False, **kwargs: Any) -> Any:
        """Called on every rank for each ``invoke``/``stream``; rank 0's return value is the result."""
        return {}

    def teardown(self) -> None:
        """Called once per rank when the pool stops."""

    def on_process_group_rebuilt(self) -> None:
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

        Long ``__call__`` bodies should poll it and return early. A rank that ignores it keeps the
        pool busy until its call returns (or ``stop()`` escalates to signals).
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
        link.send(Kind.STREAM_ITEM, call, [data])

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
    order they were made). Exactly one thread receives at a time: between calls the main thread
    itself waits for the next CALL (no hand-off on the way in); while a call runs, the link thread
    receives, so CANCEL sets ``cancel_event`` and PING is answered even while ``__call__`` is busy.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.cancel_event = threading.Event()
        self.current_call = 0
        self.streaming = False
        self.broken = False
        self._rx_lock = threading.Lock()
        self._cancelled: set[int] = set()  # CANCELs that may arrive before their call begins
        self._main_waker = Waker()
        self._link_waker = Waker()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lightdist-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, kind: Kind, call: int = 0, payload: list[bytes] | None = None) -> None:
        """Sign and send now; any thread."""
        self.channel.send(kind, call, payload or ())

    def next_command(self) -> Message | None:
        """Main thread, between calls: the next CALL or EXIT; None if the channel broke."""
        while True:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                pass
            if self.broken:
                return None
            try:
                self._receive()
                if self.inbox.empty():
                    select.select([self.channel.fd, self._main_waker.fd], [], [])
                    self._main_waker.clear()
            except (zmq.ZMQError, OSError, ValueError):
                return None

    def begin_call(self, call: int, streaming: bool) -> None:
        self.cancel_event.clear()
        self.streaming = streaming
        self.current_call = call
        if call in self._cancelled:
            self.cancel_event.set()
        self._link_waker.wake()  # the link thread receives while the call runs

    def end_call(self) -> None:
        self._cancelled.discard(self.current_call)
        self.current_call = 0

    def close(self) -> None:
        """Stop receiving and close the socket, with a short linger so the last reply leaves."""
        self._stopping = True
        self._link_waker.wake()
        self._thread.join(timeout=10)
        self.channel.close(linger_ms=_FINAL_LINGER_MS)
        self._main_waker.close()
        self._link_waker.close()

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self.current_call == 0:  # idle: the main thread is the receiver
                    select.select([self._link_waker.fd], [], [])
                    self._link_waker.clear()
                    continue
                self._receive()
                self.channel.wait(None, extra=[self._link_waker.fd])
                self._link_waker.clear()
        except (zmq.ZMQError, OSError, ValueError):
            self.broken = True  # the socket is gone: unblock the main thread
            self._main_waker.wake()

    def _receive(self) -> None:
        # Drain and handle as one step, so two batches drained back to back by the two receiving
        # threads (as the role passes between them) are handled in arrival order.
        with self._rx_lock:
            for _, msg in self.channel.drain():
                self._handle(msg)

    def _handle(self, msg: Message) -> None:
        kind = msg.kind
        if kind is Kind.CANCEL:
            self._cancelled.add(msg.header.call)
            if msg.header.call == self.current_call:
                self.cancel_event.set()
        elif kind is Kind.PING:
            self.channel.send(Kind.PONG, msg.header.call)
        elif kind in (Kind.CALL, Kind.EXIT, Kind.REBUILD):
            self.inbox.put(msg)
            self._main_waker.wake()


def error_report(exc: BaseException) -> bytes:
    """An exception as plain data: the driver can always read it, whatever classes it has.

    ``in_collective`` says whether it was raised inside torch.distributed (a timed-out or failed
    collective): the group may then be unusable, so the driver rebuilds it before the next call.
    """
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    frames = traceback.extract_tb(exc.__traceback__)
    in_collective = any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames)
    return protocol.dumps({"exc_type": name, "message": str(exc), "traceback": tb, "in_collective": in_collective})


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
    code = _serve(worker, link, boot)
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
    sys.argv = list(boot.get("argv", sys.argv))
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
    boot["backend"] = boot["backend"] or ("nccl" if device.type == "cuda" else "gloo")
    _join_group(boot, boot["store_prefix"])
    worker_cls = protocol.loads(boot["worker_cls"])
    kwargs = protocol.loads(boot["setup_kwargs"])
    worker = worker_cls(boot["rank"], boot["world_size"])
    if not isinstance(worker, DistributedWorker):
        raise TypeError(f"{worker_cls!r} must subclass lightdist.DistributedWorker")
    worker._attach(link, boot["local_rank"], boot["local_world_size"], device)
    worker.setup(**kwargs)
    return worker


def _join_group(boot: dict[str, Any], prefix: str) -> None:
    """Join the default process group through the driver's store, under ``prefix``.

    A rebuilt group uses a fresh prefix, so keys of the broken one can never be read again.
    """
    import torch.distributed as dist

    store = dist.TCPStore(
        boot["store_host"], boot["store_port"], is_master=False,
        timeout=datetime.timedelta(seconds=boot["start_timeout"]),
    )  # fmt: skip
    dist.init_process_group(
        boot["backend"],
        store=dist.PrefixStore(prefix, store),
        rank=boot["rank"],
        world_size=boot["world_size"],
        timeout=datetime.timedelta(seconds=boot["pg_timeout"]),
    )


def _pick_device(boot: dict[str, Any]) -> torch.device:
    import torch

    want = boot["accelerator"]
    # Every rank must decide alike (one group cannot mix NCCL and gloo): GPUs only if each local
    # rank gets its own.
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_cuda = gpus >= boot["local_world_size"]
    if want == "cuda" and not has_cuda:
        raise RuntimeError(
            f"accelerator='cuda' needs a GPU per rank: {boot['local_world_size']} local ranks but "
            f"{gpus} GPU(s) visible; use accelerator='cpu' or world_size <= {gpus}"
        )
    if want == "cuda" or (want == "auto" and has_cuda):
        return torch.device("cuda", boot["local_rank"])
    return torch.device("cpu")


def _serve(worker: DistributedWorker, link: _Link, boot: dict[str, Any]) -> int:
    """Run calls until EXIT; every call ends in exactly one RESULT or ERROR reply."""
    while True:
        msg = link.next_command()
        if msg is None:  # the link broke: nobody to reply to
            return 1
        if msg.kind is Kind.EXIT:
            break
        if msg.kind is Kind.REBUILD:
            _rebuild(worker, link, boot, msg)
            continue
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


def _rebuild(worker: DistributedWorker, link: _Link, boot: dict[str, Any], msg: Message) -> None:
    """Leave the old group (it may be broken: a peer died or was killed) and join the new one."""
    try:
        _destroy_process_group()
        _join_group(boot, pickle.loads(msg.payload[0]))
        worker.on_process_group_rebuilt()
    except BaseException as exc:  # noqa: BLE001 - the driver gives up on recovery and says why
        link.send(Kind.FAILED, msg.header.call, [error_report(exc)])
        return
    link.send(Kind.REBUILT, msg.header.call)


def _run_call(worker: DistributedWorker, link: _Link, msg: Message) -> None:
    call_id = msg.header.call
    try:
        # The envelope first: the driver's sys.path must be in place before the payload, which
        # may hold objects of modules only that path can import, is unpickled.
        envelope = pickle.loads(msg.payload[0])
        link.begin_call(call_id, envelope["streaming"])
        _prepend_sys_path(envelope["sys_path"])
        if envelope["cwd"] and envelope["cwd"] != os.getcwd():
            os.chdir(envelope["cwd"])
        payload = protocol.loads(msg.payload[1])
        value = worker(streaming=envelope["streaming"], **payload)
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
