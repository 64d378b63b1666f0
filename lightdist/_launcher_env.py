"""What an agent learns from its host and its launcher, and what it must not pass on to its ranks.

Launchers (SLURM, torchrun, MPI, Kubernetes) set variables for their own rank model; an agent reads
them only as a placement hint (:func:`node_hint`) and removes them before its ranks start
(:func:`scrub_launcher_environment`): the pool's layout is the only truth. :func:`route_interface`
finds the interface that reaches the driver, for gloo's and NCCL's ``*_SOCKET_IFNAME``.
"""

from __future__ import annotations

import os
import socket

__all__ = ["LAUNCHER_VARIABLES", "node_hint", "route_interface", "scrub_launcher_environment"]

# Prefixes and names of variables that launchers set for their own rank model.
LAUNCHER_VARIABLES = (
    "SLURM_",
    "PMI_",
    "PMIX_",
    "OMPI_",
    "TORCHELASTIC_",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "JOB_COMPLETION_INDEX",
)


def node_hint(env: dict[str, str]) -> int | None:
    """This host's index in the launcher's own numbering, if it says: a placement hint only."""
    for name in ("LIGHTDIST_NODE_INDEX", "SLURM_NODEID", "JOB_COMPLETION_INDEX", "GROUP_RANK", "NODE_RANK"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return None


def route_interface(address: str) -> tuple[str, str | None]:
    """(local IP, interface name) this host uses to reach ``tcp://host:port``.

    gloo and NCCL advertise an address to their peers; without ``GLOO_SOCKET_IFNAME`` they may pick
    one the other hosts cannot reach (in a network namespace gloo advertised 127.0.0.1)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host.strip("[]"), int(port)))  # UDP: picks the route, sends nothing
        local_ip = str(probe.getsockname()[0])
    finally:
        probe.close()
    return local_ip, _interface_of(local_ip)


def _interface_of(ip: str) -> str | None:
    import fcntl
    import struct

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    finally:
        sock.close()
    return None


def scrub_launcher_environment() -> None:
    for name in list(os.environ):
        if name.startswith(LAUNCHER_VARIABLES):
            del os.environ[name]
