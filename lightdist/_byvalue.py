"""Pickling for another process that shares the caller's installed packages, not its own code.

A lightdist server runs a client's Trainer call in its long-lived process and ranks. Both run
in the same environment, so whatever is *installed* (the standard library, site-packages) is
imported there by name, as pickle normally does. The client's own modules are another matter:
a ``mymod.py`` next to the notebook, a project package on ``PYTHONPATH`` or installed editable.
The server may not be able to import them (another working directory, another ``sys.path``),
and a server that did import one would keep that first version for as long as it runs, while the
user edits the file. So :func:`dumps` pickles them **by value** (cloudpickle copies their
functions and classes into the pickle), exactly as it already does for ``__main__``.

Which modules go by value (:func:`user_modules`): a top-level module or package from
``sys.modules`` whose source file (or, for a namespace package, every directory on its
``__path__``) lies outside the interpreter's installation (``sys.prefix``, ``sys.base_prefix``,
``sys.exec_prefix``, ``sys.base_exec_prefix``) and outside every site-packages or dist-packages
directory; not a standard-library or built-in name; pure Python (no loaded submodule is a
compiled extension, whose C types cloudpickle cannot copy); and not ``lightdist`` itself, whose
classes the server must see as its own. Registering a package covers its submodules.
"""

from __future__ import annotations

import importlib.machinery
import os
import site
import sys
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import cloudpickle

from lightdist import protocol

__all__ = ["dumps", "user_modules"]

# Imported by name on the other side: the server is made of them.
_ALWAYS_BY_REFERENCE = frozenset({"lightdist", "__main__", "__mp_main__"})
_SITE_DIRS = ("site-packages", "dist-packages")
_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)

# cloudpickle's by-value registry is process-wide: a module is registered only while one dumps()
# runs, under this lock, so two threads encoding at once never unregister each other's modules.
_lock = threading.Lock()


def dumps(obj: Any) -> bytes:
    """``protocol.dumps(obj)``, with the caller's own modules (:func:`user_modules`) by value."""
    with _lock:
        registered = cloudpickle.list_registry_pickle_by_value()
        added = [m for m in user_modules() if m.__name__ not in registered]
        for module in added:
            cloudpickle.register_pickle_by_value(module)
        try:
            return protocol.dumps(obj)
        finally:
            for module in added:
                cloudpickle.unregister_pickle_by_value(module)


def user_modules() -> list[ModuleType]:
    """The top-level modules of ``sys.modules`` that :func:`dumps` pickles by value (see the module
    docstring for the rule), sorted by name."""
    roots = _installation_roots()
    tops: dict[str, list[ModuleType]] = {}
    for name, module in list(sys.modules.items()):
        if isinstance(module, ModuleType):
            tops.setdefault(name.partition(".")[0], []).append(module)
    found = []
    for top, modules in sorted(tops.items()):
        head = sys.modules.get(top)
        if head is None or top in _ALWAYS_BY_REFERENCE or top in sys.builtin_module_names:
            continue
        if top in sys.stdlib_module_names:
            continue
        if _is_user_source(head, roots) and not any(_is_extension(m) for m in modules):
            found.append(head)
    return found


def _installation_roots() -> tuple[str, ...]:
    """Directories whose modules count as installed (trailing separator, so /usr/lib never
    matches /usr/lib2)."""
    dirs: set[str] = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    dirs.update(site.getsitepackages())
    user_site = site.getusersitepackages()
    if user_site:
        dirs.add(user_site)
    # Site directories that reach sys.path some other way (PYTHONPATH, a .pth file).
    dirs.update(p for p in sys.path if p and os.path.basename(os.path.normpath(p)) in _SITE_DIRS)
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


def _is_user_source(module: ModuleType, roots: tuple[str, ...]) -> bool:
    file = getattr(module, "__file__", None)
    places: Iterable[str]
    if isinstance(file, str):
        if not file.endswith((".py", ".pyc")):
            return False  # a compiled extension, or something a loader made up
        places = [file]
    else:
        path = getattr(module, "__path__", None)  # a namespace package: directories only
        places = [p for p in path if isinstance(p, str)] if path is not None else []
    places = [os.path.realpath(p) for p in places]
    return bool(places) and all(os.path.exists(p) and not _under(p, roots) for p in places)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    with_sep = os.path.join(path, "")
    return any(with_sep.startswith(root) for root in roots)


def _is_extension(module: ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    return isinstance(file, str) and file.endswith(_EXTENSIONS)
