"""Which device kind the ranks of a host use: one decision, made alike by every rank (and ahead of
time by the driver, for its own host), as a pure function so it is tested without GPUs."""

from __future__ import annotations

__all__ = ["choose_device", "driver_visible_gpus"]


def choose_device(gpus: int, local_world_size: int, accelerator: str) -> tuple[str, str | None]:
    """``("cuda" | "cpu", warning or None)`` for ``local_world_size`` ranks on a host with ``gpus``.

    Every rank must decide alike (one process group cannot mix NCCL and gloo), so GPUs are used
    only if each local rank gets its own. ``"auto"`` falling back to CPU although GPUs are there is
    almost never what the user meant: it comes with a warning that says how to fix or silence it.

    Raises:
        RuntimeError: ``accelerator="cuda"`` with fewer GPUs than local ranks.
    """
    enough = gpus >= local_world_size
    if accelerator == "cuda" and not enough:
        raise RuntimeError(
            f"accelerator='cuda' needs a GPU per rank: {local_world_size} local ranks but "
            f"{gpus} GPU(s) visible; use accelerator='cpu' or world_size <= {gpus}"
        )
    if accelerator == "cpu":
        return "cpu", None
    if enough and gpus > 0:
        return "cuda", None
    if accelerator == "auto" and gpus > 0:
        return "cpu", (
            f"{gpus} GPU(s) visible for {local_world_size} local ranks: every rank runs on CPU; "
            f"use world_size <= {gpus} to use the GPUs, or accelerator='cpu' to silence this"
        )
    return "cpu", None


def driver_visible_gpus() -> int | None:
    """The GPUs this (driver) process sees, or None when they cannot be counted safely.

    Counted through NVML only: ``torch.cuda.device_count`` falls back to the CUDA runtime when NVML
    fails, and that initialises CUDA in the driver, which breaks CUDA in processes the user's code
    forks later. torch exposes the NVML count only privately, so its absence means "unknown".
    """
    import torch

    if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]
        return 0
    count_nvml = getattr(torch.cuda, "_device_count_nvml", None)
    if count_nvml is None:
        return None
    try:
        count = int(count_nvml())
    except Exception:  # noqa: BLE001 - an unknown count only skips an early warning
        return None
    return None if count < 0 else count
