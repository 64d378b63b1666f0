"""``strategy="lightdist"`` is registered whichever of lightdist and Lightning is imported first.

Each order needs a fresh interpreter (the registration happens at import), so each case is one
subprocess that builds a Trainer and prints its strategy class. ``import lightdist`` alone must
still not import Lightning (runner-only users and the thin clients never pay for it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

BUILD_TRAINER = (
    "t = L.Trainer(strategy='lightdist', accelerator='cpu', devices=2, logger=False, "
    "enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)\n"
    "print(type(t.strategy).__name__)\n"
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)


BUILD_FABRIC = "print(type(Fabric(strategy='lightdist', accelerator='cpu', devices=2).strategy).__name__)\n"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # The order isort/ruff produce: lightdist sorts before lightning (the other order has always
        # worked and every other Lightning test uses it).
        ("import lightdist\nimport lightning as L\n" + BUILD_TRAINER, "PoolStrategy"),
        ("import lightdist\nimport pytorch_lightning as L\n" + BUILD_TRAINER, "PoolStrategy"),
        # Fabric's registry is its own: importing only lightning.fabric registers there too.
        ("import lightdist\nfrom lightning.fabric import Fabric\n" + BUILD_FABRIC, "FabricPoolStrategy"),
    ],
    ids=["lightdist-then-lightning", "lightdist-then-pytorch_lightning", "lightdist-then-lightning.fabric"],
)
def test_the_strategy_name_works_in_either_import_order(code: str, expected: str) -> None:
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected


def test_importing_lightdist_alone_imports_no_lightning() -> None:
    code = (
        "import sys, lightdist\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
