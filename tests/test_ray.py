"""The Ray launcher on a local multi-node Ray cluster (skipped when ray is not installed).

``ray.cluster_utils.Cluster`` starts a real head and a second real node (each its own raylet) on
this machine; ``start_agents`` places one agent per node with a STRICT_SPREAD placement group; the
pool forms over lightdist's own TCP channel and the call crosses both nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightdist import DistributedRunner, WorkerDiedError
from lightdist.keys import create_pool_keys
from tests.conftest import free_port
from tests.test_multihost import Gather

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_one_agent_per_ray_node_forms_the_pool(ray_cluster: Any, tmp_path: Path) -> None:
    from lightdist.ray import start_agents

    driver_key, client_key = create_pool_keys(tmp_path / "keys")
    address = f"tcp://127.0.0.1:{free_port()}"
    pool = DistributedRunner(Gather, world_size=2, nodes=2, listen=address, key_file=driver_key, accelerator="cpu")
    agents = start_agents(address, client_key, nodes=2, nproc_per_node=1, connect_timeout=60)
    try:
        nodes = agents.nodes()
        assert len(set(nodes)) == 2, "STRICT_SPREAD: one agent per Ray node"
        pool.start_sync(timeout=90)
        assert pool.invoke_sync({}, timeout=30)["sum"] == 3
        hosts = pool.hosts
        assert sorted(hosts.values()) == [[0], [1]]
        # bundle order is rank order, and each host name carries its Ray node id
        for index, (name, _ranks) in enumerate(sorted(hosts.items(), key=lambda item: item[1])):
            assert name.startswith(f"ray{index}-") and name.endswith(nodes[index][:8]), (name, nodes)
        pool.stop_sync()
        assert agents.wait(timeout=30) == [0, 0]  # the pool's stop ends the agents too
    finally:
        pool.stop_sync()
        agents.stop()


def test_stopping_the_agents_before_the_runner_loses_every_host(ray_cluster: Any, tmp_path: Path) -> None:
    # The order docs/multinode.md asks for is runner.stop_sync() and then agents.stop(). The other
    # way round, every agent stops its ranks on SIGTERM and the driver takes it for failures.
    from lightdist.ray import start_agents

    driver_key, client_key = create_pool_keys(tmp_path / "keys")
    address = f"tcp://127.0.0.1:{free_port()}"
    pool = DistributedRunner(Gather, world_size=2, nodes=2, listen=address, key_file=driver_key, accelerator="cpu")
    agents = start_agents(address, client_key, nodes=2, nproc_per_node=1, connect_timeout=60)
    try:
        pool.start_sync(timeout=90)
        agents.stop()
        assert agents.wait(timeout=30) == [143, 143]  # SIGTERM: not the pool's stop
        with pytest.raises(WorkerDiedError):
            pool.invoke_sync({}, timeout=30)
        assert repr(pool).endswith("recovering)")  # its ranks wait for hosts that will not come
    finally:
        pool.stop_sync()
        agents.stop()
