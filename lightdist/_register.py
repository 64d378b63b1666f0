"""Register ``strategy="lightdist"`` with Lightning whichever of the two is imported first.

``import lightdist`` must not import Lightning (runner-only users and the thin clients never pay for
it), yet ``Trainer(strategy="lightdist")`` must work after ``import lightdist; import lightning`` —
the order isort and ruff produce. So when Lightning is not loaded yet, a finder on ``sys.meta_path``
waits for its top-level package (``lightning`` or the standalone ``pytorch_lightning``) and, once
that package has finished executing, imports our Lightning layer, which registers the strategy.
The finder answers no import itself: it only wraps the real loader of the two packages it watches,
and removes itself once both have been seen.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

# Lightning's top-level package -> our module that registers the strategy for it. The top-level
# package, not `lightning.pytorch`: `lightning/__init__.py` imports `lightning.pytorch` itself, and our
# layer may only import once that __init__ has finished (it uses names the package defines last).
_LAYERS = {"lightning": "lightdist.lightning", "pytorch_lightning": "lightdist.pytorch_lightning"}


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs the package's own loader, then imports the layer that registers our strategy."""

    def __init__(self, loader: importlib.abc.Loader, layer: str) -> None:
        self._loader = loader
        self._layer = layer

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # Only after a successful load: a failed `import lightning` must fail as it would without us.
        importlib.import_module(self._layer)


class _LightningWatcher(importlib.abc.MetaPathFinder):
    def __init__(self, pending: dict[str, str]) -> None:
        self._pending = dict(pending)
        self._lock = threading.Lock()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._pending:
            return None
        with self._lock:
            layer = self._pending.pop(fullname, None)
            if not self._pending and self in sys.meta_path:
                sys.meta_path.remove(self)
        if layer is None:
            return None
        spec = _find_elsewhere(self, fullname, path, target)
        if spec is None or spec.loader is None:
            return spec  # not installed: the import fails exactly as it would without us
        spec.loader = _RegisterAfterLoad(spec.loader, layer)
        return spec


def _find_elsewhere(
    watcher: _LightningWatcher, fullname: str, path: Sequence[str] | None, target: ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    for finder in list(sys.meta_path):
        if finder is watcher or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def register_with_lightning() -> None:
    """Register the strategy with each Lightning package now if loaded, else when it loads."""
    pending: dict[str, str] = {}
    for package, layer in _LAYERS.items():
        if package in sys.modules:
            importlib.import_module(layer)
        else:
            pending[package] = layer
    if pending and not any(isinstance(f, _LightningWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _LightningWatcher(pending))
