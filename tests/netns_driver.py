"""A pool driver run inside a test host's network namespace (see tests/test_multihost_netns.py).

argv: LISTEN KEY_FILE NODES WORLD_SIZE. Prints one JSON line when the pool is up, then answers each
JSON line on stdin (``{"payload": {...}}``) with one JSON line: the call's result or its error.
"""

from __future__ import annotations

import json
import sys
import time

from lightdist import DistributedRunner
from tests.test_multihost import Gather


def main() -> None:
    listen, key_file, nodes, world_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pool = DistributedRunner(
        Gather, world_size=world_size, nodes=nodes, listen=listen, key_file=key_file, accelerator="cpu", timeout=30
    )
    pool.start_sync(timeout=90)
    store_port = pool.stats().store_port
    print(json.dumps({"ready": True, "hosts": pool.hosts, "pids": pool.pids, "store_port": store_port}), flush=True)
    for line in sys.stdin:
        started = time.monotonic()
        try:
            out = pool.invoke_sync(json.loads(line).get("payload", {}), timeout=90)
            reply = {"ok": True, "out": out}
        except Exception as error:  # noqa: BLE001 - reported to the test as data
            reply = {"ok": False, "type": type(error).__name__, "error": str(error)}
        stats = pool.stats()
        security = {"rejected": stats.rejected_messages, "denied": stats.refused_clients}
        reply.update(seconds=time.monotonic() - started, hosts=pool.hosts, **security)
        print(json.dumps(reply), flush=True)
    pool.stop_sync()


if __name__ == "__main__":
    main()
