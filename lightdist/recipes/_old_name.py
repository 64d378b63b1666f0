"""The recipes' old import name, ``recipes``, for configs written before they became ``lightdist.recipes``.

:func:`install` (the ``lightdist`` CLI calls it) appends a finder to ``sys.meta_path``, so it is
asked last: a project's own top-level ``recipes`` package, found by the usual finders first, always
wins. Only when there is none does ``recipes.digits`` resolve to ``lightdist.recipes.digits``, with
a ``FutureWarning`` that names the new ``class_path``.

``recipes`` itself becomes an empty package (``__path__ = []``) so that its submodules are never
found on disk a second time under the old name: ``recipes.digits`` *is* the module object
``lightdist.recipes.digits`` (the loader puts it in ``sys.modules``, the replacement that
``importlib`` supports), so classes compare equal and pickle to the ranks by their new name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["OLD", "NEW", "install"]

OLD, NEW = "recipes", "lightdist.recipes"


class _OldNameFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == OLD:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        parent, _, _ = fullname.rpartition(".")
        # only below our own empty `recipes`, never below a project's package of that name
        if parent != OLD or getattr(sys.modules.get(OLD), "__loader__", None) is not self:
            return None
        if importlib.util.find_spec(NEW + fullname[len(OLD) :]) is None:
            return None  # the usual "No module named 'recipes.x'"
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None  # the default: an empty module, replaced in exec_module below for submodules

    def exec_module(self, module: ModuleType) -> None:
        if module.__name__ == OLD:
            module.__path__ = []  # a package whose submodules only this finder provides
            return
        new = NEW + module.__name__[len(OLD) :]
        warnings.warn(
            f"{module.__name__} is now {new}: in your config, write class_path: {new}.<Class> "
            f"(the old name {module.__name__}.<Class> will stop working)",
            FutureWarning,
            stacklevel=2,
        )
        sys.modules[module.__name__] = importlib.import_module(new)


_FINDER = _OldNameFinder()


def install() -> None:
    """Let ``class_path: recipes.<module>.<Class>`` in old configs keep working (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
