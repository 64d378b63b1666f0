"""lightdist: a warm pool of distributed training workers behind a PyTorch Lightning ``Trainer``.

Start N worker processes once, each with a torch.distributed process group (NCCL on GPU, gloo on
CPU) and a signed ZMQ command channel, then run any number of calls on them::

    from lightdist import DistributedRunner, DistributedWorker

    class Echo(DistributedWorker):
        def __call__(self, text: str, streaming: bool = False) -> str:
            return f"rank {self.rank} of {self.world_size}: {text}"

    with DistributedRunner(Echo, world_size=2) as runner:
        print(runner.invoke_sync({"text": "hello"}))
"""

from typing import TYPE_CHECKING

from lightdist.errors import (
    ConfigError,
    PoolClosedError,
    TextEventError,
    WorkerDiedError,
    WorkerError,
    WorkerFailedError,
)

if TYPE_CHECKING:
    from lightdist.lightning import PoolStrategy
    from lightdist.runner import DistributedRunner
    from lightdist.worker import DistributedWorker

__all__ = [
    "ConfigError",
    "DistributedRunner",
    "PoolStrategy",
    "DistributedWorker",
    "PoolClosedError",
    "TextEventError",
    "WorkerDiedError",
    "WorkerError",
    "WorkerFailedError",
    "shutdown",
]

__version__ = "0.1.0"


# Loaded on first use: the thin clients (`lightdist fit --server`, `lightdist jobs`) start in a
# tenth of a second without the pool's machinery (zmq, asyncio), and runner-only users never pay
# for importing lightning.
_LAZY = {
    "DistributedRunner": "lightdist.runner",
    "DistributedWorker": "lightdist.worker",
    "PoolStrategy": "lightdist.lightning",
}


def shutdown(timeout: float = 10) -> int:
    """Stop the shared pools that ``Trainer(strategy="lightdist")`` started in this process.

    Their ranks exit now (each gets ``timeout`` seconds to finish ``teardown``) instead of at
    interpreter exit; the next Trainer call starts a fresh pool. Pools you made yourself
    (``DistributedRunner``, ``PoolStrategy(runner=...)``) and a server's pool are not touched.
    Returns how many pools were stopped.

    Example::

        trainer.fit(model)     # starts the shared pool of devices=2
        lightdist.shutdown()   # frees its ranks (and their memory) now
    """
    import sys

    stopped = 0
    # Only the Lightning layers already imported can have pools; importing one here would cost
    # seconds to find nothing.
    for layer in ("lightdist.lightning._shared", "lightdist.pytorch_lightning._shared"):
        module = sys.modules.get(layer)
        if module is not None:
            stopped += module.shutdown(timeout)
    return stopped


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightdist' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


# `Trainer(strategy="lightdist")` works whichever of lightdist and Lightning is imported first, and
# importing lightdist never imports Lightning.
from lightdist._register import register_with_lightning  # noqa: E402

register_with_lightning()
