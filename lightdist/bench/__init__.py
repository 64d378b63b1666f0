"""``python -m lightdist.bench pool [--repeats 3] [--items 20000] [--calls 2000] [--json out.json]``
``python -m lightdist.bench recovery [--repeats 5] [--grace 2.0] [--json out.json]``
``python -m lightdist.bench lightning [--fits 5] [--steps 20] [--throughput-steps 300] [--json out.json]``
``python -m lightdist.bench fabric [--launches 5] [--steps 20] [--json out.json]``
``python -m lightdist.bench recipes [--only digits] [--json out.json]``
``python -m lightdist.bench sweep [--repeats 2] [--epochs 3] [--json out.json]``
``python -m lightdist.bench multihost [--repeats 3] [--calls 500] [--json out.json]``
``python -m lightdist.bench models [--sizes 50M,200M] [--fits 3] [--variants full,frozen] [--json out.json]``
``python -m lightdist.bench optimizer-state [--size 50M] [--fits 3] [--json out.json]``
``python -m lightdist.bench gpu [--budget 480] [--out gpu-results.md]`` (the GPU proof kit, docs/gpu.md)

``pool`` measures a real pool on this machine and prints one table, each number next to a baseline or
floor measured in the same command, so that the ratio holds however busy the machine is:

- pool start (``start_sync`` until every rank is READY) and stop (``stop_sync``) per world size,
  median of ``--repeats``; ratio of the largest world size to the smallest (ranks are forked from
  one template that imported torch once, so this should be near-flat);
- no-op ``invoke_sync`` round trip p50/p99 at world size 2, against a bare ZMQ ROUTER↔DEALER round
  trip to a child process (the floor: no signing, no pickling, no threads, one peer);
- stream throughput at world size 2 (rank 0 calls ``add_streaming_result(i)`` in a tight loop),
  items lost and order, against the same number of bare ZMQ messages sent one way.

Pool and floor run alternately (blocks of 100 calls, one stream each), so load from other jobs on
a shared machine shifts both sides of a ratio alike.

``recovery`` measures failure detection and recovery on one world-size-2 pool, median of
``--repeats``: SIGKILL of a rank during a call until ``WorkerDiedError``, an exception on rank 1
(while rank 0 waits in ``all_reduce``) until ``WorkerError``, and after each, and after a rank killed
while idle, the time until a call succeeds again; next to a fresh pool start measured in the same run.

``lightning`` fits a tiny MLP on 2 CPU ranks: consecutive short fits with ``strategy="lightdist"``
against ``ddp_spawn`` and against an already-warm native DDP group (a ``strategy="ddp"`` script),
and a longer fit's training throughput against native DDP.

``fabric`` times ``fabric.launch(fn)`` with ``Fabric(strategy="lightdist")`` against Fabric's own
``ddp_spawn``, each launch a new ``Fabric`` (a tiny MLP's training on 2 CPU ranks).

``recipes`` and ``sweep`` drive the ``lightdist`` console script (see :mod:`lightdist.bench.recipes`):
every shipped CPU config's metric, wall time and peak memory; and a 4-fit sweep on one pool against
the same fits as separate ``ddp_spawn`` commands.

No timing is asserted anywhere: a missed target prints FAIL and the exit code stays 0.
"""

from lightdist.bench.cli import main

__all__ = ["main"]
