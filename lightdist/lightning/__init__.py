"""The Lightning layer: ``PoolStrategy`` runs a Trainer's fit/validate/test/predict on a warm pool.

Importing this module registers ``Trainer(strategy="lightdist")`` and ``Fabric(strategy="lightdist")``
(:mod:`lightdist.lightning.fabric`).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightdist.lightning._worker import TrainerWorker
from lightdist.lightning.environment import PoolEnvironment
from lightdist.lightning.fabric import FabricPoolStrategy
from lightdist.lightning.strategy import PoolStrategy

if "lightdist" not in StrategyRegistry:
    PoolStrategy.register_strategies(StrategyRegistry)

__all__ = ["FabricPoolStrategy", "PoolEnvironment", "PoolStrategy", "TrainerWorker"]
