"""``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one, never half.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction, whose local writer puts the
bytes in a file made by ``tempfile.mkstemp()`` (in ``$TMPDIR``) and ``shutil.move``s it onto the
target: across filesystems that move is a copy, so a full disk or a killed process leaves
``last.ckpt`` truncated (and a ``resume from "last"`` then fails), and a killed process leaves the
whole temp file in ``$TMPDIR``. Here the bytes go to a temp file **beside** the target, are
fsync'd, and ``os.replace`` puts them in place, which on one filesystem is atomic.

Temp files are named ``.lightdist-ckpt-<target>.<pid>.<random>.tmp`` (the ``.tmp`` suffix keeps them
out of Lightning's ``*.ckpt`` searches, e.g. for ``ckpt_path="last"``). A failed write removes its
own; what a killed process left is removed by :func:`remove_stale_temp_files`, which the launcher
runs on the checkpoint directories when a Trainer call starts and which runs before the first
write into a directory.

Remote paths (``s3://...``) keep Lightning's own save, whose object stores write atomically.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from typing_extensions import override

# What Lightning passes as a checkpoint path (its own alias, _PATH, is private).
PathLike = str | Path

__all__ = ["TEMP_PREFIX", "TEMP_SUFFIX", "AtomicCheckpointIO", "atomic_save", "remove_stale_temp_files"]

TEMP_PREFIX = ".lightdist-ckpt-"
TEMP_SUFFIX = ".tmp"

# A temp file last written before this process started was not written by this process (nor by the
# pool it belongs to, whose calls all come later): a write that was killed or abandoned.
_PROCESS_STARTED = time.time()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see the module docstring).

    ``PoolStrategy`` uses it unless a ``CheckpointIO`` plugin is given. Example::

        Trainer(strategy="lightdist", plugins=[AtomicCheckpointIO()])  # the same, explicitly
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # raises for storage_options
            return
        target = Path(fs._strip_protocol(str(path)))  # "file://x" names the local file x
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.parent not in self._swept:  # once per directory: a listing per save would be waste
            remove_stale_temp_files(target.parent)
            self._swept.add(target.parent)
        atomic_save(checkpoint, target)

    def __getstate__(self) -> dict[str, Any]:
        # The strategy travels to the ranks with every call: each process sweeps for itself.
        return {**self.__dict__, "_swept": set()}


def atomic_save(obj: Any, target: Path) -> None:
    """``torch.save(obj)`` to ``target`` through a temp file in the same directory and ``os.replace``.

    The temp file is removed on every exit path that runs Python (errors, KeyboardInterrupt); only
    a killed process leaves it, for :func:`remove_stale_temp_files`.
    """
    temp = target.parent / f"{TEMP_PREFIX}{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        # O_EXCL: never another writer's file; mode 0o666 less the umask, as a plain open() gives.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)  # streamed to the file: no second copy of the checkpoint in memory
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        disk_error = _os_error_in(exc)
        if disk_error is not None and disk_error is not exc:
            # torch's zip writer, failing to finish the file, hides ENOSPC behind "enforce fail at
            # inline_container.cc": the disk's own error says what to do.
            raise disk_error from None
        raise
    _fsync_directory(target.parent)  # the rename itself survives a power cut


def remove_stale_temp_files(directory: PathLike, older_than: float | None = None) -> list[Path]:
    """Remove lightdist checkpoint temp files in ``directory`` last written before ``older_than``
    (a ``time.time()``; default: when this process started). Returns what was removed.

    A write in progress keeps touching its file, so only abandoned ones are this old.
    """
    cutoff = _PROCESS_STARTED if older_than is None else older_than
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)):
                continue
            with contextlib.suppress(FileNotFoundError):  # another process's sweep got there first
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _os_error_in(error: BaseException) -> OSError | None:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not every filesystem lets a directory be opened; the file itself was fsync'd
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
