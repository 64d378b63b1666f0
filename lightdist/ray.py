"""Start one ``lightdist agent`` per node of an existing Ray cluster (``pip install 'lightdist[ray]'``).

::

    import ray
    from lightdist import DistributedRunner
    from lightdist.ray import start_agents

    ray.init(address="auto")
    runner = DistributedRunner(MyWorker, world_size=8, nodes=2, listen="tcp://10.0.0.1:29400",
                               key_file="/shared/pool/driver.json")
    agents = start_agents("tcp://10.0.0.1:29400", "/shared/pool/client.json", nodes=2, nproc_per_node=4,
                          num_gpus_per_node=4)
    runner.start_sync()          # forms the pool when both agents attached
    ...
    runner.stop_sync(); agents.stop()   # in this order: the runner's stop lets the agents exit 0

Stopping the agents first SIGTERMs them while the pool still runs: the driver sees every host die
(warnings, a recovery, ``WorkerDiedError`` for the next call), see docs/multinode.md.

Ray only *places* the agents: a placement group with one bundle per node and ``STRICT_SPREAD``
(no two on one node), and an actor per bundle that runs the agent as a child process. Calls,
results and failure detection stay on lightdist's own channel and heartbeat: a Ray actor call costs
about 5x a lightdist call, and Ray takes tens of seconds to declare a partitioned node dead, where the
pool's heartbeat takes 2 s. The client key file must be readable at the same path on every node
(a shared file system or a secret mounted on each node); it never travels through Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from lightdist._lifetime import die_with_parent

__all__ = ["RayAgents", "start_agents"]


class _AgentActor:
    """Runs ``lightdist agent`` on its node as a child that dies with this actor (PDEATHSIG)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def run(self, connect: str, key_file: str, nproc: int, index: int, connect_timeout: float) -> int:
        import socket

        import ray

        node = str(ray.get_runtime_context().get_node_id())
        host = f"ray{index}-{socket.gethostname()}-{node[:8]}"
        argv = [
            sys.executable,
            "-m",
            "lightdist.cli",
            "agent",
            "--connect",
            connect,
            "--key-file",
            key_file,
            "--nproc-per-node",
            str(nproc),
            "--host-name",
            host,
            "--connect-timeout",
            str(connect_timeout),
        ]
        # The bundle index orders the hosts (it is the agent's placement hint, like SLURM_NODEID).
        env = {**os.environ, "LIGHTDIST_NODE_INDEX": str(index)}
        self.proc = subprocess.Popen(argv, env=env, preexec_fn=die_with_parent)
        return self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the agent stops its ranks on SIGTERM


@dataclass
class RayAgents:
    """The placed agents: ``wait()`` for their exit codes, ``stop()`` to end them and free the nodes."""

    placement_group: Any
    actors: list[Any]
    runs: list[Any] = field(default_factory=list)  # ObjectRefs of each actor's run()

    def nodes(self) -> list[str]:
        """The Ray node id of each agent, in bundle order (all different: STRICT_SPREAD)."""
        import ray

        return list(ray.get([actor.node.remote() for actor in self.actors], timeout=60))

    def wait(self, timeout: float | None = None) -> list[int]:
        import ray

        return list(ray.get(self.runs, timeout=timeout))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the agents still running, wait up to ``timeout`` for them, free the nodes.
        Call it after the runner's ``stop()``, which lets the agents exit on their own."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            actor.stop.remote()
        try:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            remove_placement_group(self.placement_group)


def start_agents(
    connect: str,
    key_file: str | os.PathLike[str],
    nodes: int,
    nproc_per_node: int = 1,
    *,
    num_cpus_per_node: float = 1,
    num_gpus_per_node: float = 0,
    placement_timeout: float = 120.0,
    connect_timeout: float = 300.0,
) -> RayAgents:
    """Place one agent on each of ``nodes`` distinct Ray nodes and start it; returns at once.

    Raises ``TimeoutError`` (and frees what it reserved) if the cluster cannot give ``nodes``
    distinct nodes with the resources asked for within ``placement_timeout`` seconds.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if nodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nodes and nproc_per_node must be >= 1, got {nodes} and {nproc_per_node}")
    bundle: dict[str, float] = {"CPU": num_cpus_per_node}
    if num_gpus_per_node:
        bundle["GPU"] = num_gpus_per_node
    group = placement_group([dict(bundle) for _ in range(nodes)], strategy="STRICT_SPREAD")
    ready, _ = ray.wait([group.ready()], timeout=placement_timeout)
    if not ready:
        remove_placement_group(group)
        raise TimeoutError(
            f"Ray could not place {nodes} agents on distinct nodes with {bundle} each within "
            f"{placement_timeout} s; check `ray status` for free nodes"
        )
    actor_cls: Any = ray.remote(_AgentActor)  # Ray's actor handles are dynamic
    actors: list[Any] = [
        actor_cls.options(
            num_cpus=num_cpus_per_node,
            num_gpus=num_gpus_per_node,
            max_concurrency=4,  # run() blocks for the agent's life: node() and stop() must still answer
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i),
        ).remote()
        for i in range(nodes)
    ]
    runs = [
        actor.run.remote(connect, os.fspath(key_file), nproc_per_node, i, connect_timeout)
        for i, actor in enumerate(actors)
    ]
    return RayAgents(group, actors, runs)
