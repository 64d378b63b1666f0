"""Moving tensor bytes between processes of one host without pickling them.

Two primitives, both Linux-only and both checked once per pool (see :func:`probe_report`):

* **memfd** (driver → ranks). The driver packs the storages of a call into one anonymous
  ``memfd_create`` file and names it in the signed CALL as ``(pid, fd)``; a rank opens it through
  ``/proc/<pid>/fd/<fd>`` (same user only) and maps it ``MAP_PRIVATE``. An anonymous file has no name
  in any file system, so nothing can outlive the processes that hold it: not a SIGKILLed driver, not
  a SIGKILLed rank. Frozen weights stay mapped (every rank shares the same pages; a write would
  copy-on-write that page only), trainable ones are copied out once (the copy a rank needs to own a
  writable tensor), so the file's pages are freed once every rank took them.
* **process_vm_readv** (rank → driver). The driver is the ranks' ancestor, so it may read their
  memory (ptrace rules, Yama scope 1 included): rank 0 names the addresses of the tensors that
  changed and the driver copies them straight into its own model's tensors, with no buffer between.

A resident call also lets the driver *adopt* a second memfd holding only its model's weights: once
a storage's bytes are there, the driver's own tensors are re-pointed at them (:meth:`MemFile.adopt`)
and its private copy is freed, so the model exists once in the driver, not twice; frozen weights,
mapped by every rank, then exist once on the whole host. Each adopted :class:`Region` gives its
pages back (a hole in the file) as soon as the driver's storage on it dies, so a dropped model or a
replaced tensor frees its memory even while the rest of the file lives.

Where either is refused (a hardened kernel, a container without ptrace, ranks on other hosts) the
pool falls back to signed ZMQ frames (:mod:`lightdist._tensors`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["ByteRegion", "MemFile", "Region", "map_private", "open_remote_fd", "trim_heap", "vm_read"]

PAGE = mmap.PAGESIZE
_IOV_MAX = 1024  # iovecs per process_vm_readv call (Linux's UIO_MAXIOV)


def align(n: int) -> int:
    """``n`` rounded up to a whole page (each storage starts on its own page, so it maps alone)."""
    return (n + PAGE - 1) // PAGE * PAGE


class MemFile:
    """One anonymous shared-memory file holding storages of a call, written once by its creator.

    The file is mapped while it is written and unmapped by :meth:`seal`; only the descriptor stays
    open, until :meth:`close` (when every reader has opened it, or the call is over).
    """

    def __init__(self, size: int, name: str = "lightdist") -> None:
        self.size = max(PAGE, align(size))
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            # Allocating the pages in one go is several times faster than faulting them in one by one
            # while copying (measured: a first-touch copy runs at a fraction of memory bandwidth).
            os.posix_fallocate(self.fd, 0, self.size)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.pid = os.getpid()

    def region(self, offset: int, nbytes: int) -> memoryview:
        assert self._map is not None, "sealed"
        return memoryview(self._map)[offset : offset + nbytes]

    def adopt(self, offset: int, nbytes: int) -> Region:
        """A shared, writable mapping of ``[offset, offset + nbytes)`` for the creator's own tensors.

        It needs no descriptor once made, and frees its pages in the file when it is dropped."""
        return Region(self.fd, align(nbytes), offset=offset)

    def seal(self) -> None:
        """Unmap (writing is over); readers map the file themselves."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still exported: the mapping goes with it
                pass
            self._map = None

    def close(self) -> None:
        self.seal()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Region(mmap.mmap):
    """One adopted storage's bytes in a :class:`MemFile`, mapped shared by the file's creator.

    When the last tensor on it dies, its pages are removed from the file (``MADV_REMOVE``: a hole, as
    ``fallocate(PUNCH_HOLE)`` makes), so a dropped model frees its memory even while other regions of
    the file live. Only in the process that made it: a child forked from the driver inherits the
    mapping, and dropping its copy of a tensor must not free the driver's pages."""

    def __init__(self, fd: int, length: int, offset: int) -> None:
        self.owner = os.getpid()

    def __del__(self) -> None:
        if os.getpid() == self.owner and not self.closed:
            try:
                self.madvise(mmap.MADV_REMOVE)
            except (OSError, ValueError):  # refused: the pages go with the file
                pass


def trim_heap() -> None:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), so tensors of a few MB
    come from the heap, and freed ones stay in its free lists: resident, counted in RSS and PSS. A
    process that exits after each fit (``ddp_spawn``) never notices; one that stays warm must."""
    try:
        _libc_handle().malloc_trim(0)
    except AttributeError:  # pragma: no cover - not glibc
        pass


def open_remote_fd(pid: int, fd: int) -> int:
    """Open another process's descriptor through ``/proc`` (same user; raises ``OSError`` if refused)."""
    return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def map_private(fd: int, size: int) -> mmap.mmap:
    """A private, writable mapping of a memfd: reads share the file's pages, a write copies the page."""
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class ByteRegion:
    """``(address, nbytes)`` of memory in another process, as named in a signed message."""

    __slots__ = ("address", "nbytes")

    def __init__(self, address: int, nbytes: int) -> None:
        self.address = address
        self.nbytes = nbytes


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc: Any = None


def _libc_handle() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.process_vm_readv.restype = ctypes.c_ssize_t
    return _libc


def _process_vm_readv() -> Any:
    return _libc_handle().process_vm_readv


def vm_read(pid: int, pairs: Sequence[tuple[int, int, int]]) -> None:
    """Copy ``(local_address, remote_address, nbytes)`` regions from process ``pid`` into ours.

    Raises ``OSError`` (EPERM where ptrace is refused, ESRCH when the process is gone, EFAULT for a
    bad address) and never returns with a region half copied without saying so.
    """
    call = _process_vm_readv()
    for start in range(0, len(pairs), _IOV_MAX):
        chunk = pairs[start : start + _IOV_MAX]
        local = (_IOVec * len(chunk))(*[_IOVec(dst, n) for dst, _, n in chunk])
        remote = (_IOVec * len(chunk))(*[_IOVec(src, n) for _, src, n in chunk])
        want = sum(n for _, _, n in chunk)
        done = call(pid, local, len(chunk), remote, len(chunk), 0)
        if done < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")
        if done != want:  # a partial read: only at a region boundary; read the rest one by one
            vm_read_rest(pid, chunk, done)


def vm_read_rest(pid: int, chunk: Sequence[tuple[int, int, int]], done: int) -> None:
    for dst, src, n in chunk:
        if done >= n:
            done -= n
            continue
        vm_read(pid, [(dst + done, src + done, n - done)])
        done = 0


def probe_buffer() -> tuple[ctypes.Array[ctypes.c_char], dict[str, Any]]:
    """A small buffer of random bytes and its description, for the driver to test ``vm_read`` on."""
    data = os.urandom(32)
    buf = ctypes.create_string_buffer(data, len(data))
    return buf, {"pid": os.getpid(), "address": ctypes.addressof(buf), "bytes": data}


def probe_report(probe: dict[str, Any]) -> bool:
    """Whether this process can read the memory that ``probe`` (from :func:`probe_buffer`) names."""
    got = ctypes.create_string_buffer(len(probe["bytes"]))
    try:
        vm_read(probe["pid"], [(ctypes.addressof(got), probe["address"], len(probe["bytes"]))])
    except OSError:
        return False
    return bool(got.raw == probe["bytes"])
