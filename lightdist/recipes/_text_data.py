"""Built-in text data for the text recipes (standard-library docstrings, nothing downloaded), and the
file readers, checks and batching they share.

The classification task (:func:`labelled_examples`): given the first paragraph of the docstring of a
public standard-library function, class or method, say which area of the library it comes from:

- ``text``: string, re, textwrap, difflib, unicodedata, codecs, html, locale, gettext, csv, shlex,
  and the methods of ``str``;
- ``files``: os.path, shutil, pathlib, glob, fnmatch, tempfile, filecmp, zipfile, tarfile, gzip,
  bz2, lzma, stat, fileinput;
- ``math``: math, cmath, statistics, fractions, decimal, random, numbers;
- ``network``: socket, http.client, http.server, http.cookies, urllib.request, urllib.parse, smtplib,
  email.message, email.utils, ftplib, ssl, ipaddress, poplib, imaplib, socketserver.

The text is real (written by CPython's authors) and read from the running interpreter, so the exact
examples depend on the Python version; within one installation they are deterministic (names are
visited in sorted order, duplicates dropped, classes balanced by a seeded draw). About 200 examples
per label on Python 3.11. Under ``python -OO`` docstrings are stripped and the data set is empty.

:func:`corpus` gives every docstring paragraph of the same modules as plain text, for the causal-LM
recipe and for training the tiny models' tokenizers.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset

__all__ = [
    "AREAS",
    "LABELS",
    "Records",
    "check_model_dir",
    "collate",
    "corpus",
    "labelled_examples",
    "read_records",
    "split_examples",
]

_R = TypeVar("_R")

AREAS: dict[str, tuple[str, ...]] = {
    "files": (
        "os.path",
        "shutil",
        "pathlib",
        "glob",
        "fnmatch",
        "tempfile",
        "filecmp",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "stat",
        "fileinput",
    ),
    "math": ("math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"),
    "network": (
        "socket",
        "http.client",
        "http.server",
        "http.cookies",
        "urllib.request",
        "urllib.parse",
        "smtplib",
        "email.message",
        "email.utils",
        "ftplib",
        "ssl",
        "ipaddress",
        "poplib",
        "imaplib",
        "socketserver",
    ),
    "text": (
        "string",
        "re",
        "textwrap",
        "difflib",
        "unicodedata",
        "codecs",
        "html",
        "html.parser",
        "locale",
        "gettext",
        "csv",
        "shlex",
        "builtins.str",
    ),
}
LABELS: list[str] = sorted(AREAS)

# os.path is posixpath (or ntpath) re-exporting genericpath: its functions name those modules.
_OWNERS = {"os.path": ("posixpath", "genericpath", "ntpath")}
# A paragraph that is only a call signature ("find(sub[, start]) -> int") says nothing about the area.
_SIGNATURE = re.compile(r"^[\w.\[\] ,]+\(.*\)(\s*->.*)?$")


def _own(module: str, obj: object) -> bool:
    """Whether ``obj`` is defined by ``module`` (or its C accelerator), not imported into it."""
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    if owner in _OWNERS.get(module, ()):
        return True
    bare = owner.lstrip("_")
    return bare.split(".")[0] == module.split(".")[0] or bare == "py" + module  # _pydecimal


def _members(module: str) -> Iterator[object]:
    """Public functions and classes of ``module`` and the public methods of those classes, sorted."""
    if module == "builtins.str":
        tops: list[object] = [str]
    else:
        mod = importlib.import_module(module)
        tops = [getattr(mod, name) for name in sorted(dir(mod)) if not name.startswith("_")]
        tops = [obj for obj in tops if callable(obj) and _own(module, obj)]
    for obj in tops:
        yield obj
        if inspect.isclass(obj):
            yield from (v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v))


def _paragraphs(doc: str) -> list[str]:
    pars = (" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)))
    return [p for p in pars if p and not _SIGNATURE.match(p)]


def _docstrings(modules: tuple[str, ...]) -> Iterator[str]:
    for module in modules:
        for obj in _members(module):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                yield doc


@functools.lru_cache(maxsize=1)
def _by_label() -> dict[str, list[str]]:
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for label in LABELS:
        texts = out.setdefault(label, [])
        for doc in _docstrings(AREAS[label]):
            pars = _paragraphs(doc)
            # 20 characters: shorter first paragraphs are mostly "Return x." and carry no signal.
            if pars and len(pars[0]) >= 20 and pars[0] not in seen:
                seen.add(pars[0])
                texts.append(pars[0])
    return out


def labelled_examples(balanced: bool = True) -> list[tuple[str, str]]:
    """``(text, label)`` pairs, labels in :data:`LABELS`; ``balanced`` keeps the same number per label.

    Balancing draws with a fixed seed from each label's sorted list, so chance accuracy is 1/4.
    """
    groups = _by_label()
    keep = min(len(texts) for texts in groups.values()) if balanced else None
    pairs: list[tuple[str, str]] = []
    for label in LABELS:
        texts = groups[label]
        if keep is not None and len(texts) > keep:
            texts = sorted(random.Random(f"builtin-{label}").sample(texts, keep))
        pairs += [(text, label) for text in texts]
    return pairs


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for label in LABELS:
        for doc in _docstrings(AREAS[label]):
            for par in _paragraphs(doc):
                if len(par) >= 40 and par not in seen:  # 40: drop one-word and "Return x." fragments
                    seen.add(par)
                    out.append(par)
    return tuple(out)


def corpus() -> list[str]:
    """Every distinct docstring paragraph (40+ characters, whitespace collapsed) of :data:`AREAS`'s
    modules, one string per paragraph, in a fixed order."""
    return list(_corpus())


def read_records(path: str, setting: str, columns: tuple[str, ...], hint: str) -> list[dict[str, str]]:
    """Rows of a ``.csv`` (header row) or ``.jsonl`` (one object per line) file, keeping ``columns``.

    Every column in ``columns`` must be present and non-empty in every row (numbers are turned into
    strings). Any problem raises :class:`lightdist.ConfigError` naming ``setting`` (``data.train_file``)
    and ending with ``hint``, before a worker starts.
    """
    import csv
    import json
    from pathlib import Path

    from lightdist import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{setting}: no such file: {path!r} ({hint})")
    suffix = file.suffix.lower()
    rows: list[dict[str, object]] = []
    with file.open(encoding="utf-8", newline="") as handle:
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(
                    f"{setting}: {path!r} has no {missing[0]!r} column (header: {reader.fieldnames}); {hint}"
                )
            rows = list(reader)
        elif suffix == ".jsonl":
            for n, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{setting}: line {n} of {path!r} is not JSON ({exc}); {hint}") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{setting}: line {n} of {path!r} is not a JSON object; {hint}")
                rows.append(row)
        else:
            raise ConfigError(f"{setting}: {path!r} is neither .csv nor .jsonl ({hint})")
    out: list[dict[str, str]] = []
    for n, row in enumerate(rows, 1):
        values = {c: row.get(c) for c in columns}
        for column, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
                raise ConfigError(
                    f"{setting}: row {n} of {path!r} has no {column!r} (or it is empty or not a string); {hint}"
                )
        out.append({c: str(v) for c, v in values.items()})
    if not out:
        raise ConfigError(f"{setting}: {path!r} has no examples; {hint}")
    return out


def split_examples(
    records: list[_R], val_fraction: float, seed: int, max_examples: int | None, hold_out: bool = True
) -> tuple[list[_R], list[_R]]:
    """Shuffle ``records`` with ``seed``, keep the first ``max_examples``, then hold out the last
    ``val_fraction`` of them (at least one) as validation when ``hold_out``: ``(train, val)``.

    Shuffling before capping matters: the built-in data is sorted by label, so a plain cap would
    keep a single label.
    """
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    if max_examples is not None:
        shuffled = shuffled[:max_examples]
    if not hold_out:
        return shuffled, []
    n_val = max(1, round(len(shuffled) * val_fraction))
    return shuffled[:-n_val], shuffled[-n_val:]


def check_model_dir(path: str, setting: str, hint: str) -> str:
    """``path`` if it is a local Hugging Face model directory (it has ``config.json``), else
    :class:`lightdist.ConfigError` naming ``setting`` and ending with ``hint``."""
    from pathlib import Path

    from lightdist import ConfigError

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{setting}: no such directory: {path!r} ({hint})")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{setting}: {path!r} is not a Hugging Face model directory (no config.json); {hint}")
    return str(directory)


class Records(Dataset[dict[str, Any]]):
    """A list of example dicts as a map-style dataset; each item also carries its ``index`` (its
    position in the file), so predictions can be matched to their input."""

    def __init__(self, records: list[dict[str, str]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.records[index]}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of :class:`Records` items: ``{"index": LongTensor, key: list[str] for every other key}``.

    Strings stay strings: the LightningModule tokenizes (it owns the tokenizer) and maps label names
    to ids (it owns the label list), so the data module needs no link to the model.
    """
    batch: dict[str, Any] = {"index": torch.tensor([item["index"] for item in items], dtype=torch.long)}
    for key in items[0]:
        if key != "index":
            batch[key] = [item[key] for item in items]
    return batch
