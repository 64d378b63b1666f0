"""``PoolStrategy`` for the standalone ``pytorch_lightning`` package.

``pytorch_lightning.Trainer`` rejects strategy classes of ``lightning.pytorch`` (and the other way
round), so this package provides the same classes built on ``pytorch_lightning``. Its modules are
those of :mod:`lightdist.lightning` with ``lightning.pytorch`` / ``lightning.fabric`` imports
rewritten to ``pytorch_lightning`` / ``lightning_fabric`` when they load — the way Lightning itself
makes the standalone package from the unified one — so there is one source to keep correct.
Importing this package registers ``pytorch_lightning.Trainer(strategy="lightdist")``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).resolve().parent.parent / "lightning"
_RENAMES = (
    ("lightdist.lightning", "lightdist.pytorch_lightning"),
    ("lightning.pytorch", "pytorch_lightning"),
    ("lightning.fabric", "lightning_fabric"),
)


class _RewritingLoader(importlib.abc.Loader):
    def __init__(self, source: Path) -> None:
        self.source = source

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        text = self.source.read_text()
        for old, new in _RENAMES:
            text = text.replace(old, new)
        # Compiled under the original file name: tracebacks point at lines of the real source.
        exec(compile(text, str(self.source), "exec"), module.__dict__)  # noqa: S102


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        prefix = __name__ + "."
        if not fullname.startswith(prefix):
            return None
        source = _SOURCE / (fullname[len(prefix) :] + ".py")
        if not source.is_file():
            return None
        return importlib.machinery.ModuleSpec(fullname, _RewritingLoader(source), origin=str(source))


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())

from pytorch_lightning.strategies import StrategyRegistry  # noqa: E402

from lightdist.pytorch_lightning._worker import TrainerWorker  # noqa: E402
from lightdist.pytorch_lightning.environment import PoolEnvironment  # noqa: E402
from lightdist.pytorch_lightning.strategy import PoolStrategy  # noqa: E402

if "lightdist" not in StrategyRegistry:
    PoolStrategy.register_strategies(StrategyRegistry)

__all__ = ["PoolEnvironment", "PoolStrategy", "TrainerWorker"]
