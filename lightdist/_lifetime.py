"""Process lifetime, shared by every process of a pool (driver, template, ranks, agents, Ray actors)."""

from __future__ import annotations

import signal

__all__ = ["die_with_parent"]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; a no-op elsewhere).

    Cheap and import-free, so it is safe in a ``preexec_fn``. The caller checks ``os.getppid()``
    afterwards if the parent may already have died."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
