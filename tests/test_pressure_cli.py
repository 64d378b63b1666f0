"""Pressure on the edges (issue 12): checkpoints written atomically, bad ``--ckpt_path`` and model/data
pairings stopped in the driver with one line, and payload keys the ranks could not take refused in
the caller. Real files, a real tmpfs (in a private mount namespace), the real CLI and real pools."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightdist import DistributedRunner
from lightdist.cli import main as cli_main
from lightdist.cli._checkpoint import check_ckpt_path
from lightdist.errors import ConfigError
from lightdist.lightning import TrainerWorker
from lightdist.lightning import strategy as strategy_module
from lightdist.lightning.checkpoint_io import TEMP_PREFIX, TEMP_SUFFIX
from lightdist.lightning.strategy import PoolStrategy
from tests.cli_helpers import CONFIGS, ROOT, run_cli
from tests.conftest import shared_lightning_pool
from tests.test_lightning import Regressor, loader, trainer

ENV = {"PYTHONPATH": str(ROOT)}  # the subprocesses import this checkout, wherever lightdist is installed


def lightning_checkpoint(path: Path, numel: int = 4096) -> Path:
    """A small file shaped like a Lightning checkpoint (what the CLI's check asks of one)."""
    torch.save(
        {"state_dict": {"w": torch.arange(numel, dtype=torch.float32)}, "pytorch-lightning_version": "2.6"}, path
    )
    return path


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX))


# --- 9. checkpoints are written atomically --------------------------------------------------------

FULL_DISK_SCRIPT = """
import json, os, sys, torch
from lightdist.lightning.strategy import PoolStrategy
directory = sys.argv[1]
target = os.path.join(directory, "last.ckpt")
io = PoolStrategy().checkpoint_io  # what the ranks save with
io.save_checkpoint({"state_dict": {"w": torch.ones(64 * 1024)}}, target)  # 256 KiB: fits
try:
    io.save_checkpoint({"state_dict": {"w": torch.full((512 * 1024,), 2.0)}}, target)  # 2 MiB: does not
    error = None
except OSError as exc:
    error = exc.errno
try:
    w = torch.load(target, weights_only=True)["state_dict"]["w"]
    intact = w.numel() == 64 * 1024 and bool((w == 1).all())
except Exception as exc:
    intact = repr(exc)
print(json.dumps({"errno": error, "intact": intact, "files": sorted(os.listdir(directory))}))
"""


def test_a_full_disk_keeps_the_old_last_ckpt_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """The second save meets a full 1 MiB tmpfs: the first checkpoint is still whole, nothing else is there.

    The tmpfs lives in a private mount namespace (``unshare -m``), gone when the process exits. With
    Lightning's default IO the bytes went to $TMPDIR (another filesystem) and were copied onto
    last.ckpt, truncating it."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small tmpfs in a private mount namespace")
    disk = tmp_path / "disk"
    disk.mkdir()
    shell = 'mount -t tmpfs -o size=1m tmpfs "$1" || exit 77; exec "$2" -c "$3" "$1"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell, "sh", str(disk), sys.executable, FULL_DISK_SCRIPT],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=90,
    )
    if proc.returncode == 77 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["errno"] == 28, "ENOSPC reaches the caller"
    assert outcome["intact"] is True, f"last.ckpt was damaged: {outcome['intact']}"
    assert outcome["files"] == ["last.ckpt"], "no temp file is left beside it"


class Unpicklable:
    """Stops ``torch.save`` half way through pickling, with the given exception."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self) -> tuple[object, ...]:
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("cannot pickle"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path: Path, error: BaseException) -> None:
    io = PoolStrategy().checkpoint_io
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    with pytest.raises(type(error)):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": Unpicklable(error)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_stale_temp_files_are_removed_before_the_first_write_and_fresh_ones_kept(tmp_path: Path) -> None:
    """What a killed writer left (older than this process) goes; a write in progress elsewhere stays."""
    stale = tmp_path / f"{TEMP_PREFIX}last.ckpt.4242.deadbeef{TEMP_SUFFIX}"
    fresh = tmp_path / f"{TEMP_PREFIX}epoch=1.ckpt.4343.cafef00d{TEMP_SUFFIX}"
    unrelated = tmp_path / "notes.tmp"
    for path in (stale, fresh, unrelated):
        path.write_bytes(b"x" * 1000)
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    PoolStrategy().checkpoint_io.save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", fresh.name, unrelated.name])


def test_a_user_checkpoint_io_is_kept() -> None:
    from lightning.pytorch.plugins import TorchCheckpointIO

    given = TorchCheckpointIO()
    t = trainer(plugins=[given])
    assert t.strategy.checkpoint_io is given


@pytest.fixture(scope="module")
def lightning_pool() -> Iterator[None]:
    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        yield


def test_a_fit_on_the_pool_removes_stale_writes_and_saves_atomically(tmp_path: Path, lightning_pool: None) -> None:
    """At the start of a Trainer call the driver sweeps the checkpoint directory; rank 0 then saves
    through the atomic IO (the checkpoint loads, no temp file is left)."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    stale = ckpts / f"{TEMP_PREFIX}last.ckpt.999999.0badf00d{TEMP_SUFFIX}"
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    t = trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=ckpts, save_last=True)])
    t.fit(Regressor(), loader())
    assert temp_files(ckpts) == []
    assert "state_dict" in torch.load(ckpts / "last.ckpt", weights_only=True)


# --- 10. bad checkpoints in the CLI ---------------------------------------------------------------


def truncated(tmp_path: Path) -> Path:
    path = lightning_checkpoint(tmp_path / "truncated.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def corrupted(tmp_path: Path) -> Path:
    """A flipped run of bytes inside a tensor: torch.load would load it as a wrong weight."""
    path = lightning_checkpoint(tmp_path / "corrupted.ckpt")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the 16 KiB tensor, which is most of the file
    data[middle : middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["state_dict"]["w"].numel() == 4096, "torch.load does not notice"
    return path


def empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    return path


def missing(tmp_path: Path) -> Path:
    return tmp_path / "missing.ckpt"


def not_lightning(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (truncated, "is truncated"),
        (corrupted, "fails its CRC check"),
        (empty, "is empty"),
        (missing, "no such file"),
        (not_lightning, "has no 'state_dict'"),
    ],
    ids=["truncated", "corrupted", "empty", "missing", "not-lightning"],
)
def test_a_bad_ckpt_path_is_one_line_and_exit_2_before_any_worker(tmp_path: Path, make, problem: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    proc = run_cli(
        "validate",
        "--config",
        CONFIGS / "digits/pretrain-cpu.yaml",
        "--ckpt_path",
        path.name,
        cwd=tmp_path,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and path.name in lines[0] and problem in lines[0], proc.stderr
    assert "weights_only=False" not in proc.stderr
    assert proc.stdout == ""  # not even the Trainer's "GPU available" lines: nothing was built
    assert not (tmp_path / "runs").exists(), "no log folder is written"


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """For the console script's ``main`` called in this process (a subprocess costs ~10 s of imports;
    the tests above run the real script): in ``tmp_path``, with the variables that seed_everything
    sets put back afterwards."""
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_a_bad_ckpt_path_from_a_config_file_is_caught_too(
    tmp_path: Path, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated(tmp_path)
    config = tmp_path / "resume.yaml"
    config.write_text("ckpt_path: truncated.ckpt\n")
    assert cli_main(["fit", "--config", str(CONFIGS / "digits/pretrain-cpu.yaml"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lightdist fit: error: ckpt_path: 'truncated.ckpt' is truncated" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_lightnings_special_ckpt_path_values_and_good_files_pass(tmp_path: Path) -> None:
    for special in ("last", "best", "hpc"):
        check_ckpt_path(special)
    check_ckpt_path(str(lightning_checkpoint(tmp_path / "good.ckpt")))
    with pytest.raises(ConfigError, match="is a directory"):
        check_ckpt_path(str(tmp_path))


def test_a_model_that_cannot_use_the_data_stops_in_the_driver(
    tmp_path: Path, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process, a pool started by mistake would also fail the autouse leak check.
    args = ["fit", "--config", str(CONFIGS / "digits/pretrain-cpu.yaml"), "--data"]
    assert cli_main([*args, "lightdist.recipes.text_classification.TextDataModule"]) == 2
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]
    assert last.startswith(
        "lightdist fit: error: data: lightdist.recipes.text_classification.TextDataModule has no digit"
    )
    assert "Traceback" not in err and "lightdist: fit on" not in out
    assert not list(tmp_path.glob("runs/**/version_*"))


def test_a_run_that_fails_before_its_first_step_leaves_no_log_folder(
    tmp_path: Path, lightning_pool: None, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The failure is on the ranks (exit 1); the version_N folder rank 0 had written is removed. The
    console script's main, in this process, on the module's warm pool: the ranks' part is the same,
    and neither a Lightning import nor a pool start is paid again."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / "digits/pretrain-cpu.yaml"),
        "--model",
        "tests.cli_models.FailsOnFirstStep",
    ]
    assert cli_main([*args, "--model.num_classes=5", "--trainer.enable_progress_bar=false"]) == 1
    assert "fails on its first step" in capsys.readouterr().err
    assert (tmp_path / "runs/digits/pretrain").is_dir(), "the run did get as far as the ranks"
    assert not list(tmp_path.glob("runs/**/version_*"))


# --- 11. payload keys the ranks could not take -----------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "error", "match"),
    [
        ({1: "x"}, TypeError, "must be str, got 1"),
        ({("a",): "x"}, TypeError, "must be str"),
        ({"self": 1}, ValueError, "'self' cannot be a payload key"),
        ({"streaming": True}, ValueError, "'streaming' is set by the runner"),
    ],
    ids=["int", "tuple", "self", "streaming"],
)
def test_payload_keys_are_checked_in_the_caller(echo_pool: DistributedRunner, payload, error, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        echo_pool.invoke_sync(payload, timeout=30)
    with pytest.raises(error, match=match):
        next(iter(echo_pool.stream_sync(payload, timeout=30)))

    async def both() -> None:
        with pytest.raises(error, match=match):
            await echo_pool.invoke(payload, timeout=30)
        with pytest.raises(error, match=match):
            async for _ in echo_pool.stream(payload, timeout=30):
                pass

    asyncio.run(both())
    assert echo_pool.invoke_sync({"after": 1}, timeout=30)["payload"] == {"after": 1}, "the pool still serves"


def test_a_keepalive_payload_with_bad_keys_is_refused_at_construction() -> None:
    with pytest.raises(TypeError, match="must be str"):
        DistributedRunner(keepalive_payload={0: "ping"}, keepalive_interval=5)
