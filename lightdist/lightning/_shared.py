"""The process-wide pools of ``Trainer(strategy="lightdist")``: one per layout, and how they end.

A Trainer that names no pool gets the shared one of its (world size, accelerator), started on first
use. They end at interpreter exit (``DistributedRunner`` registers that), at :func:`shutdown`, or
after ``idle_timeout`` seconds without a call when a strategy asked for one: in a notebook that tried
``devices=1`` and then ``devices=2`` both pools would otherwise hold their ranks (and, on GPUs,
their memory) until the kernel stops.

The idle check runs on one daemon thread that exists only while some shared pool has a timeout.
It stops a pool under the same lock that :func:`lease` takes, and only when the pool itself has run
nothing for the timeout and no strategy has leased it for as long: a Trainer about to call its pool
cannot lose it between the lease and the call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lightdist.runner import DistributedRunner

__all__ = ["lease", "shutdown"]

log = logging.getLogger("lightdist")

Layout = tuple[int, str]  # (world size, accelerator)

pools: dict[Layout, DistributedRunner] = {}
lock = threading.Lock()
_idle_timeouts: dict[Layout, float] = {}
_last_lease: dict[Layout, float] = {}
_reaper: threading.Thread | None = None
_wake = threading.Condition(lock)


def lease(layout: Layout, make: Callable[[], DistributedRunner], idle_timeout: float | None) -> DistributedRunner:
    """The shared pool of ``layout`` (made with ``make`` if there is none), marked as just used.

    ``idle_timeout`` (seconds, or None to keep the current setting) applies to that pool from now on;
    the last strategy to give one wins."""
    with lock:
        runner = pools.get(layout)
        if runner is None:
            runner = pools[layout] = make()
            _mention_other_pools(layout)
        _last_lease[layout] = time.monotonic()
        if idle_timeout is not None:
            _idle_timeouts[layout] = idle_timeout
            _start_reaper()
            _wake.notify_all()
        return runner


def shutdown(timeout: float = 10) -> int:
    """Stop every shared pool of ``Trainer(strategy="lightdist")`` in this process and free its ranks.

    The next Trainer call starts a fresh pool. Explicit pools (``PoolStrategy(runner=...)``) and a
    server's pool are not touched. Returns how many pools were stopped.

    Example::

        trainer.fit(model)     # starts the devices=2 pool
        lightdist.shutdown()   # its ranks exit now, not at interpreter exit
    """
    global _reaper
    with lock:
        stopping = list(pools.values())
        pools.clear()
        _idle_timeouts.clear()
        _last_lease.clear()
        reaper, _reaper = _reaper, None
        _wake.notify_all()
    for runner in stopping:
        runner.stop_sync(timeout)
    if reaper is not None:
        reaper.join(timeout)
    return len(stopping)


def _mention_other_pools(layout: Layout) -> None:
    others = [f"{world} {accelerator} rank(s)" for world, accelerator in pools if (world, accelerator) != layout]
    if others:
        log.info(
            "lightdist: starting a pool of %d %s rank(s); the pool of %s stays warm beside it "
            "(lightdist.shutdown() stops the shared pools, PoolStrategy(idle_timeout=...) stops idle ones)",
            layout[0],
            layout[1],
            ", ".join(others),
        )


def _start_reaper() -> None:
    global _reaper
    if _reaper is None:
        _reaper = threading.Thread(target=_reap, name="lightdist-idle-pools", daemon=True)
        _reaper.start()


def _reap() -> None:
    me = threading.current_thread()
    with lock:
        while _reaper is me and _idle_timeouts:
            now = time.monotonic()
            waits = []
            for layout, timeout in list(_idle_timeouts.items()):
                runner = pools[layout]
                idle = runner.idle_seconds()
                quiet = now - _last_lease[layout]
                if idle is not None and min(idle, quiet) >= timeout:
                    # Under the lock: a Trainer leasing this layout now waits, then starts a new pool.
                    log.info("lightdist: stopping the idle pool of %d %s rank(s) after %g s", *layout, timeout)
                    del pools[layout], _idle_timeouts[layout], _last_lease[layout]
                    runner.stop_sync()
                else:
                    # Busy (None) or not idle long enough: look again when it could first expire.
                    waits.append(timeout - min(idle or 0.0, quiet))
            if waits:
                _wake.wait(max(min(waits), 0.05))
        _clear_reaper(me)


def _clear_reaper(me: threading.Thread) -> None:
    global _reaper
    if _reaper is me:
        _reaper = None
