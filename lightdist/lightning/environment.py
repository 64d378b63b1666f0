"""``PoolEnvironment``: Lightning's view of where a rank sits, answered by the pool.

The environment object is created in the driver and pickled to the ranks with the strategy, so it
must never hold driver values: every answer is read lazily in the process that asks (the pool sets
``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` in each rank; the driver is rank 0 of a 1-process view).
"""

from __future__ import annotations

import os

from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from typing_extensions import override

__all__ = ["PoolEnvironment"]


class PoolEnvironment(ClusterEnvironment):
    """The ranks are the pool's processes: Lightning must not create or renumber any."""

    def __init__(self, world_size: int | None = None) -> None:
        self._expected_world_size = world_size

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True  # the pool made them; Lightning launches nothing

    @property
    @override
    def main_address(self) -> str:
        return "127.0.0.1"  # unused: the pool's process group exists before Lightning looks

    @property
    @override
    def main_port(self) -> int:
        return 0

    @staticmethod
    @override
    def detect() -> bool:
        return False  # never auto-selected: only PoolStrategy installs it

    @override
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", self._expected_world_size or 1))

    @override
    def set_world_size(self, size: int) -> None:
        if self._expected_world_size is not None and size != self._expected_world_size:
            raise ValueError(
                f"the Trainer asks for {size} processes but the lightdist pool has {self._expected_world_size}; "
                "match devices/num_nodes to the pool"
            )

    @override
    def global_rank(self) -> int:
        return int(os.environ.get("RANK", 0))

    @override
    def set_global_rank(self, rank: int) -> None:
        pass  # the pool numbered the ranks; Lightning's arithmetic gives the same number

    @override
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @override
    def node_rank(self) -> int:
        return int(os.environ.get("NODE_RANK", 0))  # set by the pool from its layout, like RANK

    @override
    def teardown(self) -> None:
        pass  # the rank's environment belongs to the pool (LightningEnvironment deletes WORLD_SIZE)
