"""Tensors out of band: the object graph is pickled, the bytes of its tensors are not.

:func:`encode` pickles an object with cloudpickle, but every CPU tensor (``torch.Tensor`` or
``nn.Parameter``) is reduced to a *slot*: its storage travels beside the pickle, once per storage
(views and tied weights share it), and :func:`decode` rebuilds the tensor on that storage. How the
storage bytes travel is the *transport*:

* ``shm`` (driver → ranks on this host): one memfd per call (:class:`lightdist._shm.MemFile`).
  Parameters that require grad are *copied* out by each rank (training writes them); everything
  else is *mapped* copy-on-write, so ranks share one copy of frozen weights and read-only data.
  In a resident call the model's weights go to a second memfd that the driver then *adopts*: its
  own tensors are re-pointed at it and their private storage freed, so the driver holds one copy,
  not two, and frozen weights exist once on the host (see :func:`_adoptable` for when that is safe).
* ``vm`` (rank → driver on this host): the message names addresses in the sender; the driver reads
  them with ``process_vm_readv`` while the sender holds them (until its next command).
* ``frames`` (across hosts, or where the above are refused): each storage is one more ZMQ frame,
  sent without a copy and signed with the message like every frame.

A storage that the receiver already holds from an earlier call and that has not changed since is
sent as a reference only (``ref``): see :mod:`lightdist._resident`, which decides that.

The manifest that says where each storage is is plain data (lists, ints, strings) inside the signed
envelope, so a receiver never opens a descriptor or reads an address that the pool's key did not
sign. Tensors of other devices, sparse or quantized tensors and tensor subclasses keep torch's own
pickling (in band).
"""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle

from lightdist import protocol
from lightdist._shm import MemFile, align, map_private, open_remote_fd, trim_heap

if TYPE_CHECKING:
    import torch

    from lightdist._resident import RankCache, ResidentSet

__all__ = ["Outbound", "byte_view", "decode", "encode"]

SHM, VM, FRAMES = "shm", "vm", "frames"
# Record kinds in a manifest: how one storage reaches the receiver.
REF, MAP, COPY, FRAME, ADDR, EMPTY = "ref", "map", "copy", "frame", "addr", "empty"


@dataclass
class Outbound:
    """One encoded object: send ``data`` and ``manifest`` (and ``buffers`` as frames), and keep
    ``memfiles`` / ``keep`` alive until every receiver took the storages, ``adopted`` until the call ends."""

    data: bytes
    manifest: dict[str, Any]
    buffers: list[Any] = field(default_factory=list)
    memfiles: list[MemFile | None] = field(default_factory=list)  # on this host: [the call's, adopted weights']
    keep: list[Any] = field(default_factory=list)
    adopted: list[Any] = field(default_factory=list)  # storages moved onto memfiles[1]: alive until the call ends
    tensor_bytes: int = 0  # storage bytes that travel with this message (references excluded)
    tensors: int = 0  # storages that travel
    refs: int = 0  # storages sent as a reference to the receiver's copy

    def release(self) -> None:
        """Every receiver took the storages (or the call is over): close the files, drop the frames."""
        for memfile in self.memfiles:
            if memfile is not None:
                memfile.close()
        self.memfiles.clear()
        self.keep.clear()
        self.buffers.clear()

    def finish(self) -> None:
        """The call is over: also let go of the adopted storages (until now, ranks may map them, and
        a storage that only the payload held, dying early, would take its pages from under them)."""
        self.release()
        self.adopted.clear()


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat ``uint8`` tensor over every byte of ``storage`` (no copy)."""
    import torch

    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _plain_tensor(obj: Any, device: str = "cpu") -> bool:
    # No tensor can exist before torch is imported (and this runs for every object pickled).
    torch = sys.modules.get("torch")
    return (
        torch is not None
        and type(obj) in (torch.Tensor, torch.nn.Parameter)
        and obj.device.type == device
        and obj.layout == torch.strided
        and not obj.is_quantized
        and not obj.is_conj()
        and not obj.is_neg()
        and (obj.is_leaf or not obj.requires_grad)  # torch itself refuses non-leaf tensors that need grad
    )


class _Slot:
    __slots__ = ("storage", "tensor", "tensors", "writable", "index")

    def __init__(self, storage: Any, tensor: Any, index: int) -> None:
        self.storage = storage
        self.tensor = tensor  # the first tensor seen on this storage (its version is the fingerprint's)
        self.tensors: dict[int, Any] = {}  # every tensor pickled on it, by id
        self.writable = False  # some tensor on it is a Parameter that requires grad
        self.index = index


class _Pickler(protocol.Pickler):
    def __init__(self, file: io.BytesIO, to_cpu: bool) -> None:
        super().__init__(file, protocol=5)
        self.slots: dict[int, _Slot] = {}
        self.to_cpu = to_cpu
        self.moved: list[Any] = []  # CPU copies made here: alive until their storages are written

    def reducer_override(self, obj: Any) -> Any:
        if self.to_cpu and _plain_tensor(obj, "cuda"):
            # A result leaves a GPU rank on the CPU: unpickling a CUDA tensor would initialise CUDA
            # in the driver (and need a GPU there).
            import torch

            moved = obj.detach().to("cpu")
            moved = torch.nn.Parameter(moved, obj.requires_grad) if isinstance(obj, torch.nn.Parameter) else moved
            self.moved.append(moved)
            obj = moved
        if _plain_tensor(obj):
            import torch

            storage = obj.untyped_storage()
            slot = self.slots.get(storage._cdata)
            if slot is None:
                slot = self.slots[storage._cdata] = _Slot(storage, obj, len(self.slots))
            slot.tensors[id(obj)] = obj
            is_param = isinstance(obj, torch.nn.Parameter)
            slot.writable = slot.writable or (is_param and obj.requires_grad)
            attrs = dict(obj.__dict__) if obj.__dict__ else None
            meta = (obj.storage_offset(), tuple(obj.size()), obj.stride(), obj.dtype, obj.requires_grad, is_param)
            return _rebuild, (slot.index, meta, attrs)
        return super().reducer_override(obj)


_decoding = threading.local()


def _rebuild(index: int, meta: tuple[Any, ...], attrs: dict[str, Any] | None) -> Any:
    import torch

    offset, size, stride, dtype, requires_grad, is_param = meta
    ctx: _DecodeContext = _decoding.ctx
    tensor = torch.empty(0, dtype=dtype).set_(ctx.storages[index], offset, size, stride)
    tensor = torch.nn.Parameter(tensor, requires_grad) if is_param else tensor.requires_grad_(requires_grad)
    if attrs:
        tensor.__dict__.update(attrs)
    if ctx.cache is not None:
        ctx.cache.rebuilt(ctx.keys[index], tensor)
    return tensor


_PLAIN_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
_PLAIN_MAX_NODES = 256


def _is_plain(obj: Any) -> bool:
    """Whether ``obj`` is built only of builtin scalars, lists, tuples and dicts (at most
    ``_PLAIN_MAX_NODES`` containers and items): then it holds no tensor and needs no cloudpickle."""
    stack = [obj]
    nodes = 0
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if kind is not dict and kind is not list and kind is not tuple:
            return False
        nodes += 1 + len(item)
        if nodes > _PLAIN_MAX_NODES:
            return False
        if kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            stack.extend(item)
    return True


def encode(obj: Any, transport: str, resident: ResidentSet | None = None, to_cpu: bool = False) -> Outbound:
    """Pickle ``obj`` with its tensors' storages out of band (see the module docstring). ``to_cpu``:
    CUDA tensors travel as CPU tensors (results, so the driver never needs CUDA). A ``resident`` call
    over ``shm`` adopts the weights it writes (see :func:`_adoptable`)."""
    if resident is None and _is_plain(obj):
        # The common small call and reply (a config, None, a few metrics): plain pickle, no
        # tensor bookkeeping. Per-call overhead is what a warm pool sells.
        return Outbound(pickle.dumps(obj, protocol=5), {"transport": transport, "records": []})
    buf = io.BytesIO()
    pickler = _Pickler(buf, to_cpu)
    pickler.dump(obj)
    slots = sorted(pickler.slots.values(), key=lambda s: s.index)
    out = Outbound(buf.getvalue(), {"transport": transport, "records": [], "pid": os.getpid()})
    plan: list[tuple[int, bool] | None] = [None] * len(slots)
    if resident is not None:
        keyed = resident.plan(slots)
        out.manifest["resident"] = resident.envelope(keyed)
        plan = list(keyed)
    sizes: list[int] = [0 if key is not None and key[1] else int(s.storage.nbytes()) for s, key in zip(slots, plan)]
    # Which file each storage goes to on this host: 0, closed once every rank took the call, or 1, the
    # weights the driver adopts (a file of their own, so nothing else is kept alive with them).
    files = [
        1 if transport == SHM and resident is not None and n and _adoptable(slot, n) else 0
        for slot, n in zip(slots, sizes)
    ]
    try:
        if transport == SHM:
            for index in (0, 1):
                total = sum(align(n) for n, f in zip(sizes, files) if f == index)
                out.memfiles.append(MemFile(total, "lightdist-call") if total else None)
        _place(out, slots, plan, sizes, files, transport)
    except BaseException:
        out.release()  # never leave a memfd open behind a failed encode
        raise
    return out


def _place(
    out: Outbound,
    slots: list[_Slot],
    plan: list[tuple[int, bool] | None],
    sizes: list[int],
    files: list[int],
    transport: str,
) -> None:
    """Write each storage where ``transport`` puts it and record where, in slot order."""
    offsets = [0, 0]
    adopted = 0
    records = out.manifest["records"]
    for slot, key, nbytes, file in zip(slots, plan, sizes, files):
        k = None if key is None else key[0]
        if key is not None and key[1]:
            records.append((REF, k, slot.storage.nbytes(), None))
            out.refs += 1
            continue
        out.tensors += 1
        out.tensor_bytes += nbytes
        if nbytes == 0:
            records.append((EMPTY, k, 0, None))
        elif transport == SHM:
            memfile = out.memfiles[file]
            assert memfile is not None
            offset = offsets[file]
            _copy_into(memfile.region(offset, nbytes), slot.storage)
            records.append((COPY if slot.writable else MAP, k, nbytes, (file, offset)))
            if file == 1 and _adopt(memfile, slot, offset, nbytes):
                out.adopted.append(slot.storage)
                adopted += nbytes
            offsets[file] += align(nbytes)
        elif transport == VM:
            records.append((ADDR, k, nbytes, slot.storage.data_ptr()))
            out.keep.append(slot.storage)  # the receiver reads it from here: keep it alive and still
        else:
            records.append((FRAME, k, nbytes, len(out.buffers)))
            out.buffers.append(_buffer(slot.storage))
            out.keep.append(slot.storage)
    if any(m is not None for m in out.memfiles):  # else no TAKEN is due: nothing to map
        for memfile in out.memfiles:
            if memfile is not None:
                memfile.seal()
        out.manifest["memfds"] = [None if m is None else (m.pid, m.fd, m.size) for m in out.memfiles]
    for slot in slots:
        slot.tensors.clear()  # the ResidentSet keeps the slots until the call commits: not every tensor
    if adopted >= _TRIM_AFTER_BYTES:
        trim_heap()  # the private copies just freed sit in malloc's free lists otherwise


_TRIM_AFTER_BYTES = 64 << 20
# Each adopted storage is a mapping of its own (a kernel VMA, a finalizer): worth it for the weights
# that make a model's size, not for its many small norms and biases.
_ADOPT_MIN_BYTES = 1 << 20


def _adoptable(slot: _Slot, nbytes: int) -> bool:
    """Whether the driver may move ``slot``'s storage onto shared memory and free its own copy.

    Only a model's weights (every tensor on the storage a ``Parameter``) of at least 1 MiB, whose
    bytes torch's own allocator owns (resizable: not numpy's, a file's or already shared memory),
    and whose every user is a tensor this call pickled: a view or ``.data`` held anywhere else
    would silently stop aliasing the model, so such a storage stays where it is. Not seen: a numpy
    array made from a frozen ``Parameter`` without ``detach()`` (it points at the freed bytes)."""
    import torch

    storage = slot.storage
    if nbytes < _ADOPT_MIN_BYTES or not storage.resizable() or storage.is_shared():
        return False
    if not all(type(t) is torch.nn.Parameter for t in slot.tensors.values()):
        return False
    # A storage's users: each tensor on it, and the one Python object that stands for it (ours).
    return bool(torch._C._storage_Use_Count(storage._cdata) == len(slot.tensors) + 1)


def _adopt(memfile: MemFile, slot: _Slot, offset: int, nbytes: int) -> bool:
    """Re-point every tensor of ``slot`` at its bytes in ``memfile``; False (nothing changed) if the
    region cannot be mapped. The private storage is freed with its last reference."""
    import torch

    try:
        region = memfile.adopt(offset, nbytes)
    except OSError:  # e.g. ENOMEM at the mapping limit: the tensor simply stays where it is
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer on a writable shared mapping: no copy
        # The storage holds the mapping (torch keeps a reference to the buffer's object) and
        # nothing else does once this function returns: the mapping dies with the storage.
        storage = torch.frombuffer(region, dtype=torch.uint8, count=nbytes).untyped_storage()
    del region
    tensors = list(slot.tensors.values())
    moved = [torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.size(), t.stride()) for t in tensors]
    old = [t.data for t in tensors]
    try:
        with torch.no_grad():
            for tensor, new in zip(tensors, moved):
                tensor.data = new
    except BaseException:
        with torch.no_grad():  # all or none: tied weights must stay one storage
            for tensor, data in zip(tensors, old):
                tensor.data = data
        raise
    del old
    slot.storage = storage
    return True


def _copy_into(region: memoryview, storage: Any) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer on a memoryview of a mapping: writable, no copy
        torch.frombuffer(region, dtype=torch.uint8).copy_(byte_view(storage))
    region.release()


def _buffer(storage: Any) -> Any:
    """A buffer-protocol view of a storage's bytes (no copy), for a zero-copy ZMQ send.

    Through numpy when it is there: the array keeps the storage alive for as long as ZMQ holds the
    frame (it may still be writing it to a socket after the call ended, e.g. to a peer that died).
    Without numpy, a ctypes view: the caller keeps the storage alive (``Outbound.keep``)."""
    try:
        return byte_view(storage).numpy()
    except (ImportError, RuntimeError):  # numpy missing ("Numpy is not available")
        return (ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())


@dataclass
class _DecodeContext:
    storages: list[Any]
    keys: list[int | None]
    cache: RankCache | None


def decode(
    data: bytes | memoryview,
    manifest: dict[str, Any],
    buffers: tuple[Any, ...] | list[Any] = (),
    cache: RankCache | None = None,
    ready: dict[int, Any] | None = None,
) -> Any:
    """Rebuild what :func:`encode` made. ``ready``: storages already read (``vm``) by slot index."""
    if not manifest["records"] and cache is None:
        return pickle.loads(data)  # nothing out of band: no storages to find, no context to set
    storages, keys = take_storages(manifest, buffers, cache, ready)
    previous = getattr(_decoding, "ctx", None)
    _decoding.ctx = _DecodeContext(storages, keys, cache)
    try:
        return cloudpickle.loads(data)
    finally:
        _decoding.ctx = previous


def take_storages(
    manifest: dict[str, Any],
    buffers: tuple[Any, ...] | list[Any] = (),
    cache: RankCache | None = None,
    ready: dict[int, Any] | None = None,
) -> tuple[list[Any], list[int | None]]:
    """Every storage a manifest names, in slot order (and the resident key of each)."""
    import torch

    records = manifest["records"]
    files: dict[int, Any] = {}

    def mapped(index: int) -> Any:  # each file mapped once, when a record first needs it
        if index not in files:
            pid, fd, size = manifest["memfds"][index]
            local = open_remote_fd(pid, fd)
            try:
                files[index] = map_private(local, size)
            finally:
                os.close(local)
        return files[index]

    storages: list[Any] = []
    keys: list[int | None] = []
    for index, (kind, key, nbytes, where) in enumerate(records):
        keys.append(key)
        if kind == REF:
            assert cache is not None, "a resident reference outside a resident call"
            storages.append(cache.get(key, nbytes))
            continue
        if ready is not None and index in ready:
            storage = ready[index]
        elif kind == EMPTY:
            storage = torch.UntypedStorage(0)  # type: ignore[no-untyped-call]
        elif kind == MAP:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # The tensor keeps the mapping alive; the pages are the memfd's until written.
                storage = torch.frombuffer(
                    mapped(where[0]), dtype=torch.uint8, count=nbytes, offset=where[1]
                ).untyped_storage()
        elif kind == COPY:
            storage = _copied(memoryview(mapped(where[0]))[where[1] : where[1] + nbytes])
        elif kind == FRAME:
            storage = _copied(memoryview(buffers[where]).cast("B"))
        else:
            raise ValueError(f"a {kind!r} record must be read before decoding")
        if cache is not None and key is not None:
            cache.put(key, storage)
        storages.append(storage)
    return storages, keys


def _copied(source: memoryview) -> Any:
    import torch

    storage = torch.UntypedStorage(len(source))  # type: ignore[no-untyped-call]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only source is only read from
        byte_view(storage).copy_(torch.frombuffer(source, dtype=torch.uint8))
    source.release()
    return storage
