"""The main loop of one rank process: bootstrap, join the group, setup, then serve calls.

Entered from the template right after ``fork`` (:func:`rank_main`). Every call ends in exactly one
RESULT or ERROR reply; REBUILD makes the rank leave its (possibly broken) process group and join a
fresh one without losing its ``setup`` state.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import signal
import sys
import traceback
import warnings
from typing import TYPE_CHECKING, Any

import zmq

from lightdist import _messages as messages
from lightdist import _shm, _tensors, protocol
from lightdist._devices import choose_device
from lightdist._lifetime import die_with_parent
from lightdist._link import Link
from lightdist._messages import DRIVER_SENDER, RankBoot
from lightdist._resident import RankCache
from lightdist._shm import trim_heap
from lightdist.errors import PayloadError
from lightdist.protocol import Kind, Message, Session
from lightdist.transport import Channel
from lightdist.worker import DistributedWorker

if TYPE_CHECKING:
    import torch

__all__ = ["rank_main"]


def rank_main(boot: RankBoot, template_pid: int) -> int:
    """Entry point of a forked rank; returns the process exit code."""
    _die_with_parent(template_pid)
    _apply_environment(boot)
    context = zmq.Context()
    session = Session(boot.key, sender=boot.sender, rank=boot.rank)
    session.accept_from(DRIVER_SENDER, after_seq=boot.driver_seq)
    channel = Channel.connect_dealer(context, boot.address, boot.sender.encode(), session, curve=boot.curve)
    link = Link(channel, boot.max_frame_bytes, boot.stream_window)
    link.start()
    try:
        worker, boot = _build_worker(boot, link)
    except BaseException as exc:  # noqa: BLE001 - every setup failure is reported with its traceback
        link.send(Kind.FAILED, 0, [messages.encode_error(exc)])
        link.close()
        context.term()
        return 1
    link.send(Kind.READY, 0, [messages.encode_reach(_reach_report(boot))])
    code = _serve(worker, link, boot)
    link.close()
    context.term()
    return code


_probe_buffer: Any = None  # the driver reads it once (READY) to learn whether it can read our memory


def _reach_report(boot: RankBoot) -> dict[str, Any]:
    """What this rank can reach out of band: the driver's probe memfd, and a buffer of ours the
    driver tries to read (see lightdist._shm)."""
    global _probe_buffer
    shm_ok = False
    if boot.shm_probe:
        try:
            os.close(_shm.open_remote_fd(*boot.shm_probe))
            shm_ok = True
        except OSError:
            pass
    _probe_buffer, probe = _shm.probe_buffer()
    return {"shm": shm_ok, "probe": probe}


def _die_with_parent(template_pid: int) -> None:
    # PDEATHSIG fires when the template (our parent, single-threaded) exits; the ppid check closes
    # the race where it died before the prctl.
    die_with_parent(signal.SIGKILL)
    if os.getppid() != template_pid:
        os._exit(1)


def _apply_environment(boot: RankBoot) -> None:
    os.environ.update(
        RANK=str(boot.rank),
        WORLD_SIZE=str(boot.world_size),
        LOCAL_RANK=str(boot.local_rank),
        LOCAL_WORLD_SIZE=str(boot.local_world_size),
        NODE_RANK=str(boot.node_rank),  # the host's index in a pool across hosts
    )
    sys.argv = list(boot.argv)
    if boot.cwd:
        os.chdir(boot.cwd)
    messages.adopt_sys_path(boot.sys_path)


def _build_worker(boot: RankBoot, link: Link) -> tuple[DistributedWorker, RankBoot]:
    """The worker, set up; and ``boot`` with its backend decided (a rebuilt group uses it again)."""
    import torch

    device = _pick_device(boot)
    boot = dataclasses.replace(boot, backend=boot.backend or ("nccl" if device.type == "cuda" else "gloo"))
    if device.type == "cpu":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // boot.local_world_size))
    else:
        torch.cuda.set_device(device)
    _join_group(boot, boot.store_prefix)
    worker_cls = protocol.loads(boot.worker_cls)
    kwargs = protocol.loads(boot.setup_kwargs)
    worker = worker_cls(boot.rank, boot.world_size)
    if not isinstance(worker, DistributedWorker):
        raise TypeError(f"{worker_cls!r} must subclass lightdist.DistributedWorker")
    _check_base_init(worker)
    worker._attach(link, boot.local_rank, boot.local_world_size, device)
    worker._complete(worker.setup(**kwargs))  # awaited when async
    return worker, boot


def _check_base_init(worker: DistributedWorker) -> None:
    # Without the base __init__ the pool's own attributes are missing and every call would fail
    # with an AttributeError far from the cause: fail start() instead, saying what to fix.
    if not hasattr(worker, "_thread_calls"):  # set by DistributedWorker.__init__ alone
        name = type(worker).__qualname__
        raise TypeError(f"{name}.__init__ must call super().__init__(...)")


def _join_group(boot: RankBoot, prefix: str) -> None:
    """Join the default process group through the driver's store, under ``prefix``.

    A rebuilt group uses a fresh prefix, so keys of the broken one can never be read again.
    """
    import torch.distributed as dist

    store = dist.TCPStore(  # type: ignore[attr-defined]
        boot.store_host,
        boot.store_port,
        is_master=False,
        timeout=datetime.timedelta(seconds=boot.start_timeout),
    )
    dist.init_process_group(
        boot.backend,
        store=dist.PrefixStore(prefix, store),  # type: ignore[attr-defined]
        rank=boot.rank,
        world_size=boot.world_size,
        timeout=datetime.timedelta(seconds=boot.pg_timeout),
    )


def _pick_device(boot: RankBoot) -> torch.device:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kind, warning = choose_device(gpus, boot.local_world_size, boot.accelerator)
    if warning is not None and boot.local_rank == 0:  # once per host; shown as [rank N] by the driver
        warnings.warn(warning, stacklevel=1)
    return torch.device("cuda", boot.local_rank) if kind == "cuda" else torch.device("cpu")


def _serve(worker: DistributedWorker, link: Link, boot: RankBoot) -> int:
    """Run calls until EXIT; every call ends in exactly one RESULT or ERROR reply."""
    cache = RankCache()
    rss_after_gc = _rss_bytes()
    held: list[_tensors.Outbound] = []  # the last reply's storages: the driver reads them until our next command
    while True:
        msg = link.next_command()
        for outbound in held:
            outbound.release()
        held.clear()
        if msg is None:  # the link broke: nobody to reply to
            return 1
        if msg.kind is Kind.EXIT:
            break
        if msg.kind is Kind.REBUILD:
            _rebuild(worker, link, boot, msg)
            continue
        held.extend(_run_call(worker, link, msg, cache))
        # The CALL holds its frames (the pickled payload, bulk tensors): free them now that the call
        # is over, not when the next command replaces this one (a warm rank may idle for hours).
        del msg
        if cache.collect_due:
            # A resident (Trainer) call leaves its trainer, optimizer state and gradients in
            # reference cycles: collect now, after the reply left, not when memory has doubled.
            # Only when memory grew by what is worth a pass (~tens of ms with a Trainer's objects).
            cache.collect_due = False
            rss = _rss_bytes()
            if rss - rss_after_gc >= _COLLECT_AFTER_GROWTH:
                gc.collect()
                trim_heap()
                rss_after_gc = _rss_bytes()
    code = 0
    try:
        worker._complete(worker.teardown())
        worker._close_loop()
    except BaseException:  # noqa: BLE001 - report and still exit
        traceback.print_exc()
        code = 1
    _destroy_process_group()
    link.send(Kind.EXIT)
    return code


_COLLECT_AFTER_GROWTH = 64 << 20


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _rebuild(worker: DistributedWorker, link: Link, boot: RankBoot, msg: Message) -> None:
    """Leave the old group (it may be broken: a peer died or was killed) and join the new one."""
    try:
        _destroy_process_group()
        _join_group(boot, messages.decode_rebuild(msg.payload[0]))
        worker._complete(worker.on_process_group_rebuilt())
    except BaseException as exc:  # noqa: BLE001 - the driver gives up on recovery and says why
        link.send(Kind.FAILED, msg.header.call, [messages.encode_error(exc)])
        return
    link.send(Kind.REBUILT, msg.header.call)


def _run_call(worker: DistributedWorker, link: Link, msg: Message, cache: RankCache) -> list[_tensors.Outbound]:
    """Run one call and reply; returns the reply's storages, to hold until the next command."""
    call_id = msg.header.call
    resident = None
    try:
        # The envelope first: the driver's sys.path must be in place before the payload, which
        # may hold objects of modules only that path can import, is unpickled.
        envelope = messages.decode_envelope(msg.payload[0])
        link.begin_call(call_id, envelope["streaming"])
        messages.adopt_sys_path(envelope["sys_path"])
        if envelope["cwd"] and envelope["cwd"] != os.getcwd():
            os.chdir(envelope["cwd"])
        manifest = envelope["tensors"]
        resident = manifest.get("resident")
        if resident is not None:
            cache.begin(resident)  # prunes the previous call's storages before this one's arrive
        if msg.bulk:  # frames transport: check every tensor frame against its signed digest first
            protocol.verify_bulk(msg.payload[2], msg.bulk)
        payload = _tensors.decode(msg.payload[1], manifest, msg.bulk, cache if resident else None)
        if "memfds" in manifest:
            link.send(Kind.TAKEN, call_id)  # the driver may free its memfd now
        worker._resident = cache if resident is not None else None
        value = worker._complete(worker(streaming=envelope["streaming"], **payload))
        writeback, dropped = cache.end() if resident is not None else ({}, [])
        cache.collect_due = resident is not None
        del payload  # release the call's objects now, not when the next call replaces them
        outbound = _dump_result((value, writeback) if worker.rank == 0 else (None, {}), envelope["reply_transport"])
    except BaseException as exc:  # noqa: BLE001 - the rank keeps serving; the caller gets the error
        if resident is not None:
            cache.clear()  # the driver resends everything after a failed resident call
        worker._resident = None
        link.end_call()
        link.send(Kind.ERROR, call_id, [messages.encode_error(exc)])
        return []
    worker._resident = None
    link.end_call()
    try:
        if not dropped and not outbound.manifest["records"]:
            # The usual small reply (no tensor, nothing dropped): its data frame alone says so.
            link.send(Kind.RESULT, call_id, [outbound.data])
            return []
        reply = [messages.encode_result_meta(dropped, outbound.manifest), outbound.data]
        if outbound.buffers:
            reply.append(protocol.bulk_digests(outbound.buffers))  # hashed here, outside any lock
        link.send(Kind.RESULT, call_id, reply, bulk=outbound.buffers)
    except PayloadError as exc:  # over the channel's frame limit: the caller hears why
        outbound.release()
        link.send(Kind.ERROR, call_id, [messages.encode_error(exc)])
        return []
    return [outbound]


def _dump_result(value: Any, transport: str) -> _tensors.Outbound:
    try:
        return _tensors.encode(value, transport, to_cpu=True)
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
