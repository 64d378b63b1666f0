"""Tensors out of band: the object graph is pickled, the bytes of its tensors are not.

:func:`encode` pickles an object with cloudpickle, but every CPU tensor (``torch.Tensor`` or
``nn.Parameter``) is reduced to a *slot*: its storage travels beside the pickle, once per storage
(views and tied weights share it), and :func:`decode` rebuilds the tensor on that storage. How the
storage bytes travel is the *transport*:

* ``shm`` (driver → ranks on this host): one memfd per call (:class:`lightdist._shm.MemFile`).
  Parameters that require grad are *copied* out by each rank (training writes them); everything
  else is *mapped* copy-on-write, so ranks share one copy of frozen weights and read-only data.
  In a resident call the driver then *adopts* what it wrote: its own tensors are re-pointed at the
  memfd and their private storage freed, so the driver holds one copy, not two, and frozen weights
  exist once on the host (see :func:`_adopt` for when that is safe).
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
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle

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
    ``memfile`` / ``keep`` alive until every receiver took the storages."""

    data: bytes
    manifest: dict[str, Any]
    buffers: list[Any] = field(default_factory=list)
    memfile: MemFile | None = None
    keep: list[Any] = field(default_factory=list)
    tensor_bytes: int = 0  # storage bytes that travel with this message (references excluded)
    tensors: int = 0  # storages that travel
    refs: int = 0  # storages sent as a reference to the receiver's copy

    def release(self) -> None:
        if self.memfile is not None:
            self.memfile.close()
            self.memfile = None
        self.keep.clear()
        self.buffers.clear()


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat ``uint8`` tensor over every byte of ``storage`` (no copy)."""
    import torch

    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _plain_tensor(obj: Any, device: str = "cpu") -> bool:
    import torch

    return (
        type(obj) in (torch.Tensor, torch.nn.Parameter)
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


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
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


def encode(obj: Any, transport: str, resident: ResidentSet | None = None, to_cpu: bool = False) -> Outbound:
    """Pickle ``obj`` with its tensors' storages out of band (see the module docstring). ``to_cpu``:
    CUDA tensors travel as CPU tensors (results, so the driver never needs CUDA). A ``resident`` call
    over ``shm`` adopts the storages it writes (the caller's tensors end up on the memfd)."""
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
    total: int = sum(align(n) for n in sizes)
    if transport == SHM and total:
        out.memfile = MemFile(total, "lightdist-call")
    try:
        _place(out, slots, plan, sizes, transport, adopt=resident is not None)
    except BaseException:
        out.release()  # never leave a memfd open behind a failed encode
        raise
    return out


def _place(out: Outbound, slots: list[_Slot], plan: list[tuple[int, bool] | None], sizes: list[int],
           transport: str, adopt: bool = False) -> None:  # fmt: skip
    """Write each storage where ``transport`` puts it and record where, in slot order."""
    offset = adopted = 0
    records = out.manifest["records"]
    for slot, key, nbytes in zip(slots, plan, sizes):
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
            assert out.memfile is not None
            _copy_into(out.memfile.region(offset, nbytes), slot.storage)
            records.append((COPY if slot.writable else MAP, k, nbytes, offset))
            if adopt and _adoptable(slot):
                _adopt(out.memfile, slot, offset, nbytes)
                adopted += nbytes
            offset += align(nbytes)
        elif transport == VM:
            records.append((ADDR, k, nbytes, slot.storage.data_ptr()))
            out.keep.append(slot.storage)  # the receiver reads it from here: keep it alive and still
        else:
            records.append((FRAME, k, nbytes, len(out.buffers)))
            out.buffers.append(_buffer(slot.storage))
            out.keep.append(slot.storage)
    if out.memfile is not None:
        out.memfile.seal()
        out.manifest["memfd"] = (out.memfile.pid, out.memfile.fd, out.memfile.size)
    if adopted >= _TRIM_AFTER_BYTES:
        trim_heap()  # the private copies just freed sit in malloc's free lists otherwise


_TRIM_AFTER_BYTES = 64 << 20
_adopted_storages: set[int] = set()  # data_ptr of every live storage on an adopted memfd region


def _adoptable(slot: _Slot) -> bool:
    """Whether every user of the slot's storage is a tensor this call pickled, so that re-pointing
    those tensors leaves no one on the old bytes: a view or ``.data`` held anywhere else (an
    optimizer's, the user's) would silently stop aliasing the model, so such a storage stays where
    it is. A storage already on a memfd is not adopted again (it would pin a second region)."""
    import torch

    storage = slot.storage
    if storage.data_ptr() in _adopted_storages:
        return False
    # A storage's users: each tensor on it, and the one Python object that stands for it (ours).
    return bool(torch._C._storage_Use_Count(storage._cdata) == len(slot.tensors) + 1)


def _adopt(memfile: MemFile, slot: _Slot, offset: int, nbytes: int) -> None:
    """Re-point every tensor of ``slot`` at its bytes in ``memfile`` and drop the private storage."""
    import torch

    region = memfile.adopt(offset, nbytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer on a writable shared mapping: no copy
        # The storage holds the mapping (torch keeps a reference to the buffer's object) and
        # nothing else does once this function returns: the mapping dies with the storage.
        storage = torch.frombuffer(region, dtype=torch.uint8, count=nbytes).untyped_storage()
    pointer = storage.data_ptr()
    _adopted_storages.add(pointer)
    weakref.finalize(region, _adopted_storages.discard, pointer).atexit = False
    with torch.no_grad():
        for tensor in slot.tensors.values():
            tensor.data = torch.empty(0, dtype=tensor.dtype).set_(
                storage, tensor.storage_offset(), tensor.size(), tensor.stride()
            )
    slot.storage = storage  # the old one is freed with its last reference, this one


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
    mapped = None
    if "memfd" in manifest and any(r[0] in (MAP, COPY) for r in records):
        pid, fd, size = manifest["memfd"]
        local = open_remote_fd(pid, fd)
        try:
            mapped = map_private(local, size)
        finally:
            os.close(local)
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
                storage = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=where).untyped_storage()
        elif kind == COPY:
            assert mapped is not None
            storage = _copied(memoryview(mapped)[where : where + nbytes])
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
