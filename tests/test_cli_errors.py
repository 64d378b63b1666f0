"""The CLI's one classification of errors into exit status and message (lightdist.cli._errors)."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentError

from lightdist.cli._errors import BAD_INPUT, RANK_FAILED, classify
from lightdist.errors import ConfigError, WorkerDiedError, WorkerError


class RecipeCheck(ConfigError):
    """A recipe's own kind of config error, raised on the ranks."""


def worker_error(exc_type: str, message: str = "bad value\n  more") -> WorkerError:
    return WorkerError(0, exc_type, message, "Traceback (most recent call last):\n  ...\n")


def wrapped(error: BaseException) -> ValueError:
    """A ValueError raised while handling ``error``, as jsonargparse wraps what ``__init__`` raises."""
    try:
        raise error
    except BaseException:  # noqa: BLE001 - chained on purpose
        try:
            raise ValueError("Problem with given class_path") from None
        except ValueError as outer:
            outer.__context__ = error
            return outer


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ArgumentError(None, 'Parser key "trainer.max_epochs":\n  Expected an int'),
            (BAD_INPUT, 'Parser key "trainer.max_epochs": Expected an int'),
        ),
        (ConfigError("data.batch_size: 0 must be at least 1"), (BAD_INPUT, "data.batch_size: 0 must be at least 1")),
        (wrapped(ConfigError("model.lr: -1 must be > 0")), (BAD_INPUT, "model.lr: -1 must be > 0")),
        (worker_error("lightdist.errors.ConfigError"), (BAD_INPUT, "bad value more")),
        (worker_error(f"{__name__}.RecipeCheck"), (BAD_INPUT, "bad value more")),  # a subclass, by real class
        (worker_error("ValueError"), (RANK_FAILED, "rank 0 raised ValueError: bad value")),
        (
            worker_error("not_loaded_anywhere.ConfigError"),
            (RANK_FAILED, "rank 0 raised not_loaded_anywhere.ConfigError: bad value"),
        ),
        (worker_error(f"{__name__}.worker_error"), (RANK_FAILED, f"rank 0 raised {__name__}.worker_error: bad value")),
        (WorkerDiedError(1, None, 9), (RANK_FAILED, "rank 1 was killed by SIGKILL")),
    ],
    ids=[
        "argument",
        "config",
        "wrapped-config",
        "remote-config",
        "remote-subclass",
        "remote-other",
        "remote-unloaded",
        "remote-not-a-class",
        "died",
    ],
)
def test_errors_the_cli_reports(error: BaseException, expected: tuple[int, str]) -> None:
    assert classify(error) == expected


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("not from a config"), KeyError("x")])
def test_anything_else_is_a_bug_that_keeps_its_traceback(error: BaseException) -> None:
    assert classify(error) is None


def test_the_module_loads_without_jsonargparse() -> None:
    """``lightdist --help`` stays light: the classification imports jsonargparse only when used."""
    import subprocess
    import sys

    code = "import sys, lightdist.cli._errors; print('jsonargparse' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
