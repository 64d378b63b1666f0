"""The device decision of a host's ranks, as the pure function both the ranks and the driver use."""

from __future__ import annotations

import pytest

from lightdist._devices import choose_device, driver_visible_gpus


@pytest.mark.parametrize(
    ("gpus", "local_ranks", "accelerator", "kind"),
    [
        (0, 2, "auto", "cpu"),
        (2, 2, "auto", "cuda"),
        (4, 2, "auto", "cuda"),
        (4, 2, "cuda", "cuda"),
        (4, 2, "cpu", "cpu"),
        (1, 4, "cpu", "cpu"),  # the user chose CPU: nothing to say
        (0, 1, "cpu", "cpu"),
    ],
)
def test_choices_without_a_warning(gpus: int, local_ranks: int, accelerator: str, kind: str) -> None:
    assert choose_device(gpus, local_ranks, accelerator) == (kind, None)


def test_auto_with_fewer_gpus_than_local_ranks_runs_on_cpu_and_says_so() -> None:
    kind, warning = choose_device(2, 4, "auto")
    assert kind == "cpu"
    assert warning is not None
    assert "2 GPU(s) visible for 4 local ranks" in warning and "every rank runs on CPU" in warning
    assert "world_size <= 2" in warning and "accelerator='cpu'" in warning


@pytest.mark.parametrize(("gpus", "local_ranks"), [(0, 1), (1, 2)])
def test_cuda_with_too_few_gpus_is_an_error_that_says_what_to_do(gpus: int, local_ranks: int) -> None:
    with pytest.raises(
        RuntimeError, match=rf"{local_ranks} local ranks but {gpus} GPU\(s\) visible; use accelerator='cpu'"
    ):
        choose_device(gpus, local_ranks, "cuda")


def test_driver_counts_gpus_without_initialising_cuda() -> None:
    import torch

    count = driver_visible_gpus()
    assert count is None or count >= 0
    assert not torch.cuda.is_initialized()
