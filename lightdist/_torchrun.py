"""``lightdist worker``: one rank per process, for launchers that insist on starting every rank
(torchrun)::

    torchrun --nnodes 2 --nproc-per-node 4 ... -m lightdist.cli worker --connect tcp://DRIVER:PORT --key-file F

Each worker is an :class:`~lightdist.agent.Agent` of one rank: a one-rank host named
``<hostname>/<GROUP_RANK>.<LOCAL_RANK>``, placed by torchrun's ``RANK``, on the GPU of its
``LOCAL_RANK``, with ``NODE_RANK`` = torchrun's node index. Its own template respawns its rank in
place when the rank dies. When torchrun restarts its workers (``--max-restarts``), the old ones tell
the driver they are leaving (SIGTERM) and the new ones come back under the same names, so the
driver gives each its old rank back. See docs/multinode.md.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

from lightdist.agent import CONNECT_TIMEOUT_S, _run

__all__ = ["torchrun_identity", "worker_main"]


def torchrun_identity(env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """A torchrun worker's host name and HELLO facts, from torchrun's variables.

    The name holds the node index (``GROUP_RANK``) as well as the local rank: two torchrun nodes on
    one machine must not share names, and a restarted worker must come back under its old one
    (torchrun keeps a node's GROUP_RANK across restarts while the same nodes take part)."""
    local_rank = int(env.get("LOCAL_RANK", "0"))
    group = env.get("GROUP_RANK", "")
    name = f"{socket.gethostname()}/{group}.{local_rank}" if group.isdigit() else f"{socket.gethostname()}/{local_rank}"
    facts: dict[str, Any] = {"local_rank": local_rank, "local_world_size": int(env.get("LOCAL_WORLD_SIZE", "1"))}
    if group.isdigit():
        facts["node_rank"] = int(group)  # the rank's NODE_RANK: torchrun's node index, not its global rank
    if env.get("RANK", "").isdigit():
        facts["node_hint"] = int(env["RANK"])  # torchrun's global rank orders the one-rank "hosts"
    return name, facts


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightdist worker", description="Attach this process as one rank.")
    parser.add_argument("--connect", required=True, metavar="tcp://DRIVER:PORT", help="the driver's address")
    parser.add_argument("--key-file", required=True, help="the pool's client key file")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S)
    args = parser.parse_args(argv)
    name, facts = torchrun_identity(dict(os.environ))
    return _run(args.connect, args.key_file, 1, name, args.connect_timeout, facts, prog="lightdist worker")
