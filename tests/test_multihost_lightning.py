"""``Trainer(strategy=PoolStrategy(runner=attached), num_nodes=2, devices=2)`` on two agents.

The same fit as a single-host 4-rank pool must give the same weights (the layout only changes which
processes hold the ranks), and a second fit must reuse the attached workers.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightdist import DistributedRunner, PoolStrategy
from lightdist.keys import create_pool_keys
from lightdist.lightning import TrainerWorker
from tests.conftest import free_port
from tests.test_lightning import Regressor, loader
from tests.test_multihost import Hosts


def fit(strategy: PoolStrategy, num_nodes: int, devices: int) -> torch.Tensor:
    L.seed_everything(0)
    model = Regressor()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        num_nodes=num_nodes,
        devices=devices,
        max_epochs=2,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(64))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture
def restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them in the driver
        monkeypatch.setenv(name, "placeholder")  # recorded, so monkeypatch restores them afterwards
        monkeypatch.delenv(name)


def test_two_hosts_fit_like_one_host_with_four_ranks(tmp_path: Path, restore_env: None) -> None:
    local = DistributedRunner(TrainerWorker, world_size=4, preload=("lightning",), accelerator="cpu")
    local.start_sync(timeout=120)
    try:
        single_host = fit(PoolStrategy(runner=local), num_nodes=1, devices=4)
    finally:
        local.stop_sync()

    driver_key, client_key = create_pool_keys(tmp_path / "keys")
    address = f"tcp://127.0.0.1:{free_port()}"
    attached = DistributedRunner(
        TrainerWorker,
        world_size=4,
        nodes=2,
        listen=address,
        key_file=driver_key,
        preload=("lightning",),
        accelerator="cpu",
    )
    hosts = Hosts(client_key)
    try:
        hosts.start("a", address, env={"SLURM_NODEID": "0"})
        hosts.start("b", address, env={"SLURM_NODEID": "1"})
        attached.start_sync(timeout=120)
        pids = dict(attached.pids)
        two_hosts = fit(PoolStrategy(runner=attached), num_nodes=2, devices=2)
        torch.testing.assert_close(two_hosts, single_host)
        again = fit(PoolStrategy(runner=attached), num_nodes=2, devices=2)
        torch.testing.assert_close(again, single_host)
        assert attached.pids == pids, "the second fit reuses the attached workers"
    finally:
        attached.stop_sync()
        hosts.close()
