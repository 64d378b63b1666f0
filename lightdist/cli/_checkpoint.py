"""``--ckpt_path`` checked in the driver, before LightningCLI loads it and before any worker starts.

Without this a missing file starts the pool and fails on a rank, and a truncated, corrupted or
empty one fails in LightningCLI's own ``torch.load`` with a long traceback. The check reads the
file's zip directory and the CRC of every record (``torch.load`` does not check them: a flipped
byte in a tensor loads as a wrong weight), then unpickles it with ``weights_only=True`` and
``mmap=True`` (tensors are mapped, not read; no code in the file runs), as LightningCLI itself
loads it next, and asks for the ``state_dict`` and version every Lightning checkpoint has.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from lightdist.errors import ConfigError

__all__ = ["SPECIAL_CKPT_PATHS", "check_ckpt_path", "ckpt_path_arg"]

SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
"""Values Lightning resolves itself (from the Trainer's checkpoint callbacks), not file names."""

# Directories that Lightning's sharded strategies (FSDP, DeepSpeed) save and load as one checkpoint.
_SHARDED_MARKERS = (".metadata", "latest")

# What Lightning reads from every checkpoint it restores (the version first, to migrate old ones).
_LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version")

# Files found good, by (path, size, mtime): the command line is checked before Lightning is imported
# and the parsed config after, and a large checkpoint's CRCs are not worth reading twice.
_good: set[tuple[str, int, int]] = set()


def ckpt_path_arg(args: list[str]) -> str | None:
    """The ``--ckpt_path`` value on a command line (the last one wins, as in LightningCLI), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg == "--ckpt_path" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--ckpt_path="):
            found = arg.split("=", 1)[1]
    return found


def check_ckpt_path(value: str) -> None:
    """Raise :class:`ConfigError` (one line naming the file) unless ``value`` is a checkpoint to load."""
    if value in SPECIAL_CKPT_PATHS or value.startswith("registry") or "://" in value:
        return  # resolved by Lightning, or remote: read where it is loaded
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"ckpt_path: no such file: {value!r}")
    if path.is_dir():
        if any((path / marker).exists() for marker in _SHARDED_MARKERS):
            return
        raise ConfigError(f"ckpt_path: {value!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise ConfigError(f"ckpt_path: {value!r} is not a regular file")
    stat = path.stat()
    if stat.st_size == 0:
        raise ConfigError(f"ckpt_path: {value!r} is empty (0 bytes): not a checkpoint")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _good:
        return
    problem = _unreadable(path)
    if problem is not None:
        raise ConfigError(f"ckpt_path: {value!r} {problem}")
    _good.add(key)


def _unreadable(path: Path) -> str | None:
    """What is wrong with the file as a Lightning checkpoint, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record once and compares its CRC
    except zipfile.BadZipFile:
        # torch.save writes a zip whose directory is at the very end: a cut-off file has none.
        return "is truncated or not a checkpoint (no zip directory; torch.save writes one at the end)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if bad is not None:
        return f"is corrupted: record {bad!r} fails its CRC check"
    import torch  # here: only a command given a checkpoint pays for the check's import

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the file's problem, said in one line
        return f"cannot be loaded as a checkpoint: {_first_reason(exc)}"
    missing = [key for key in _LIGHTNING_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        return (
            f"has no {' or '.join(map(repr, missing))}: not a Lightning checkpoint "
            "(Trainer.save_checkpoint and ModelCheckpoint write one)"
        )
    return None


def _first_reason(exc: Exception) -> str:
    # torch's weights_only message spans many lines and suggests weights_only=False, which would run
    # code from the file: keep only the class it refused, or the first line of anything else.
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
    if refused is not None:
        return f"it holds a {refused.group(1)} object, which is not unpickled from a file (weights_only)"
    unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
    if unpickler is not None:
        return f"its pickle is corrupted or not a plain checkpoint ({unpickler.group(1).strip()})"
    lines = str(exc).strip().splitlines()
    if not lines or "weights_only" in lines[0]:
        return f"{type(exc).__name__} while unpickling it"
    return lines[0]
