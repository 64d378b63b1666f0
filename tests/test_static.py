"""The package stays fully typed (mypy --strict), lint-clean and formatted (ruff check, ruff format),
checked with the settings in pyproject.toml, so the README's one test command also guards them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import mypy_result

ROOT = Path(__file__).resolve().parents[1]


# Without a .mypy_cache (a fresh clone, as in CI) mypy analyses torch and Lightning first: measured
# 100 s of CPU, 144 s wall on a loaded 2-core machine. conftest.py starts it at nice 19 when the
# session's tests are collected, so it runs in the idle time between the other tests; here its
# result is collected. Past the suite's 120 s default, pytest-timeout's thread method would end
# the whole session, not just this test.
@pytest.mark.timeout(320)
def test_mypy_strict() -> None:
    returncode, output = mypy_result(timeout=300)
    assert returncode == 0, output


def test_ruff() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "lightdist", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format() -> None:
    """One formatter for everyone: no `# fmt: skip` islands, no style review in pull requests."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "lightdist", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, "run: ruff format lightdist tests\n" + proc.stdout + proc.stderr
