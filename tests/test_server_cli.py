"""The thin client (``lightdist fit ... --server``) and ``lightdist jobs`` (issue 13).

Pure functions (the flag grammar, the progress bar a command line asks for, the job views) are
tested as such. Everything else runs against the real ``lightdist serve`` the server modules share
(the ``served`` fixture; a start costs ~10-15 s) with tiny jobs (``tests.server_models.Tiny``, about a
second each on its warm pool) and a digits fit where a shipped recipe matters: the lines and exit
statuses of a local run, bad input refused before anything is queued, a failed rank's traceback,
Ctrl-C (once: the job is cancelled; twice: the client stops waiting at once), ``--detach`` and
``lightdist jobs``, the progress bar in a real terminal, and that the client imports neither torch
nor Lightning. A server that dies under a following client is tested in test_server.py, on the
server that test kills anyway.

The client runs as ``python -m lightdist.cli`` with this checkout on ``PYTHONPATH`` (the console
script in the venv may belong to another checkout), in a directory of its own: a job runs there,
and Lightning refuses to overwrite a run's config.yaml.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lightdist.cli._jobs import config_name, detail, main_metric, table
from lightdist.cli._remote import RemoteArgsError, RemoteOptions, progress_bar_kind, split_remote_args
from tests.cli_helpers import CONFIGS, ROOT
from tests.server_helpers import (
    TINY,
    ClientProcess,
    RunningServer,
    client_env,
    wait_for_state,
)
from tests.terminal import Screen, run_in_terminal

HEAVY_MODULES = ("torch", "lightning", "pytorch_lightning", "jsonargparse", "numpy")
QUIET = ["--trainer.enable_progress_bar=false"]
QUICK = ["--trainer.max_epochs=1", *QUIET]  # a digits fit: one epoch


def lightdist(*args: str | Path, state_dir: Path, cwd: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightdist.cli", *map(str, args)],
        cwd=cwd,
        env=client_env(state_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fresh(tmp_path: Path) -> Path:
    """A new directory for one client and its job."""
    directory = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    directory.mkdir()
    return directory


def tiny(*more: str) -> list[str]:
    """``lightdist fit`` of the tiny model on the local server, without a progress bar."""
    return ["fit", *TINY, *QUIET, *more, "--server"]


def job_id_in(stderr: str) -> int:
    found = re.search(r"job (\d+) on http", stderr)
    assert found, stderr
    return int(found.group(1))


def kinds_of(served: RunningServer, job_id: int) -> list[str]:
    return [kind for _, kind, _ in served.client().events(job_id)]


def first_step(served: RunningServer, job_id: int) -> None:
    """Returns once job ``job_id`` has made a training step (it is running, on the ranks)."""
    events = served.client().events(job_id)
    try:
        next(kind for _, kind, _ in events if kind == "train_batch")
    finally:
        events.close()  # no stream left open on the server


# --- the flag grammar (no process) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options", "rest"),
    [
        (["--server", "--config", "x"], RemoteOptions("auto"), ["--config", "x"]),
        (["--config", "x", "--server"], RemoteOptions("auto"), ["--config", "x"]),
        (["--server", "http://h:1", "--config", "x"], RemoteOptions("http://h:1"), ["--config", "x"]),
        (["--server=http://h:1", "--name=a", "--detach"], RemoteOptions("http://h:1", "a", True), []),
        (["--server", "auto", "--name", "a b", "--restarts", "2"], RemoteOptions("auto", "a b", False, 2), []),
        (["--config", "x", "--trainer.max_epochs=3"], RemoteOptions(), ["--config", "x", "--trainer.max_epochs=3"]),
    ],
)
def test_the_client_flags_are_taken_out_of_the_command_line(
    args: list[str], options: RemoteOptions, rest: list[str]
) -> None:
    assert split_remote_args(args) == (options, rest)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--detach", "--config", "x"], "--detach: only with --server"),
        (["--server", "--name"], "--name needs a value"),
        (["--server", "--restarts=many"], "--restarts: expected a number"),
    ],
)
def test_misplaced_client_flags_are_one_line(args: list[str], message: str) -> None:
    with pytest.raises(RemoteArgsError, match=message):
        split_remote_args(args)


def test_the_progress_bar_is_the_one_a_local_run_would_draw(tmp_path: Path) -> None:
    config = CONFIGS / "digits/pretrain-cpu.yaml"
    assert progress_bar_kind(["--config", str(config)]) == "rich"  # Lightning's default with rich installed
    assert progress_bar_kind(["--config", str(config), "--trainer.enable_progress_bar=false"]) is None
    assert progress_bar_kind(["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]) == "tqdm"
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("trainer:\n  enable_progress_bar: false\n")
    assert progress_bar_kind(["--config", str(quiet)]) is None


def test_job_views_from_the_api_fields() -> None:
    job = {
        "id": 7,
        "name": None,
        "kind": "cli",
        "command": "fit",
        "args": ["--config", str(CONFIGS / "digits/pretrain-cpu.yaml"), "--trainer.max_epochs=3"],
        "cwd": "/home/me",
        "state": "failed",
        "position": None,
        "attempt": 1,
        "restarts": 0,
        "created_at": 100.0,
        "started_at": 100.5,
        "finished_at": 112.5,
        "metrics": {"train_loss": 0.25, "val_acc": 0.875, "val_loss": 0.5},
        "artifacts": {"log_dir": "/home/me/runs/digits/pretrain/version_0"},
        "error": {
            "type": "ValueError",
            "message": "boom",
            "traceback": "Traceback (most recent call last):\n...",
            "rank": 1,
        },
        "exit_code": 1,
    }
    assert main_metric(job["metrics"]) == "val_acc=0.875"  # type: ignore[arg-type]
    assert main_metric({"train_loss": 0.25}) == "train_loss=0.25" and main_metric({}) == "-"
    assert config_name(job["args"]) == "digits/pretrain-cpu"  # type: ignore[arg-type]
    assert config_name(["--config=/elsewhere/mine.yaml"]) == "mine.yaml"
    # the checkout's configs/ is a link to the shipped configs: the same name
    assert config_name(["--config", str(ROOT / "configs/digits/pretrain-cpu.yaml")]) == "digits/pretrain-cpu"
    row = table([job]).splitlines()[1].split()
    assert row == ["7", "-", "failed", "fit", "digits/pretrain-cpu", "12.0s", "val_acc=0.875"]
    shown = detail(job)
    assert "ran 12.0s" in shown and "waited 0.5s" in shown and "log_dir" in shown
    assert "error     ValueError (rank 1): boom" in shown and shown.endswith("Traceback (most recent call last):\n...")


# --- no server -------------------------------------------------------------------------------------


def test_no_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    state_dir = tmp_path / "state" / "lightdist"  # nothing runs from here
    done = lightdist("fit", "--config", "digits/pretrain-cpu", "--server", state_dir=state_dir, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "no lightdist server is running" in done.stderr and "lightdist serve" in done.stderr
    refused = lightdist("jobs", "--server", "http://127.0.0.1:9/?token=t", state_dir=state_dir, cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "http://127.0.0.1:9" in refused.stderr and "lightdist serve" in refused.stderr


# --- against a real `lightdist serve` ----------------------------------------------------------------


@pytest.fixture
def served(shared_server: RunningServer) -> RunningServer:
    """The shared server (tests/conftest.py's ``SharedServer``), whose state dir a bare ``--server`` finds through
    ``XDG_STATE_HOME``."""
    return shared_server


@pytest.fixture
def background(served: RunningServer) -> Iterator[Callable[..., ClientProcess]]:
    """``start(*args, cwd=DIR)``: a client in the background, on ``served``; every one is killed and
    reaped when the test ends, whatever happened."""
    started: list[ClientProcess] = []

    def start(*args: str, cwd: Path) -> ClientProcess:
        started.append(ClientProcess(*args, state_dir=served.state_dir, cwd=cwd))
        return started[-1]

    yield start
    for client in started:
        client.close()


def test_a_digits_fit_through_the_server_prints_as_a_local_run(served: RunningServer, tmp_path: Path) -> None:
    done = lightdist(
        "fit",
        "--config",
        "digits/pretrain-cpu",
        "--server",
        "--name",
        "q",
        *QUICK,
        state_dir=served.state_dir,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr + served.output()
    assert "lightdist: fit on 2 rank(s), CPUAccelerator, PoolStrategy" in done.stdout
    assert re.search(r"^lightdist: fit metrics: .*val_acc=", done.stdout, re.M), done.stdout
    assert (
        f"Final checkpoint: {tmp_path}/runs/digits/pretrain/checkpoints/last.ckpt" in done.stdout
    )  # cwd: the client's
    assert (tmp_path / "runs/digits/pretrain/checkpoints/last.ckpt").is_file()
    job_id = job_id_in(done.stderr)
    assert f"job {job_id} on {served.server.url}" in done.stderr
    sent = served.client().job(job_id)
    assert sent["command"] == "fit" and sent["name"] == "q" and sent["cwd"] == str(tmp_path)
    assert sent["args"] == ["--config", str(CONFIGS / "digits/pretrain-cpu.yaml"), *QUICK]  # a name made a path


def test_the_client_imports_neither_torch_nor_lightning(served: RunningServer, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightdist.cli", *tiny()],
        cwd=tmp_path,
        env=client_env(served.state_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "lightdist.cli._remote" in imported and "lightdist._progress" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY_MODULES)
    assert not heavy, f"the thin client imported {heavy}"


def test_bad_input_is_one_line_exit_2_and_nothing_is_queued(served: RunningServer, tmp_path: Path) -> None:
    before = len(served.client().jobs(limit=1000))
    done = lightdist(
        "fit",
        "--config",
        "digits/pretrain-cpu",
        "--model.lr=fast",
        "--server",
        state_dir=served.state_dir,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "lightdist fit: error: model.lr: Expected a <class 'float'>. Got value: fast (see: lightdist fit --help)\n"
    )
    listed = json.loads(lightdist("jobs", "--json", state_dir=served.state_dir, cwd=tmp_path).stdout)
    assert len(listed) == before
    assert not (tmp_path / "runs").exists()


def test_a_failed_rank_prints_its_traceback_and_exits_1(served: RunningServer, tmp_path: Path) -> None:
    done = lightdist(*tiny("--model.fail_at_step=1"), state_dir=served.state_dir, cwd=fresh(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    raised = "RuntimeError: Tiny fails at step 1 on rank 1"
    assert f"lightdist fit: rank 1 raised {raised}\nTraceback (most recent call last):\n" in done.stderr
    assert done.stderr.endswith(f"\n{raised}\n"), done.stderr  # the rank's traceback, to its last line
    assert served.client().job(job_id_in(done.stderr))["state"] == "failed"
    # Rank 0 was left inside a collective: the pool replaces it, and the next job waits for that.
    after = lightdist(*tiny(), state_dir=served.state_dir, cwd=fresh(tmp_path))
    assert after.returncode == 0, after.stdout + after.stderr


def test_ctrl_c_cancels_only_that_job_and_the_ranks_stay_warm(
    served: RunningServer, background: Callable[..., ClientProcess], tmp_path: Path
) -> None:
    ranks = served.info()["rank_pids"]
    long_fit = tiny("--model.step_sleep=0.2", "--trainer.max_epochs=50", "--name", "long")
    client = background(*long_fit, cwd=fresh(tmp_path))
    job_id = job_id_in(client.wait_for(r"job \d+ on", timeout=30))
    first_step(served, job_id)
    client.proc.send_signal(signal.SIGINT)
    status, out = client.finish(timeout=30)
    assert status == 130, out
    assert f"cancelling job {job_id}" in out and out.rstrip().endswith("lightdist fit: interrupted"), out
    assert served.client().job(job_id)["state"] == "cancelled"
    kinds = kinds_of(served, job_id)
    assert kinds.count("run_end") == kinds.count("finished") == 1, kinds  # cancelled once, ended once
    assert served.info()["rank_pids"] == ranks  # the pool stayed warm: the same processes
    after = lightdist(*tiny(), state_dir=served.state_dir, cwd=fresh(tmp_path))
    assert after.returncode == 0, after.stdout + after.stderr
    assert served.info()["rank_pids"] == ranks


def test_a_second_ctrl_c_stops_waiting_at_once(
    served: RunningServer, background: Callable[..., ClientProcess], tmp_path: Path
) -> None:
    """Step 1 sleeps 5 s, past the pool's 2 s grace period: the client stops waiting at the second
    Ctrl-C, and the job still ends at a batch boundary with the same ranks (a cancel never cuts a
    slow step short)."""
    ranks = served.info()["rank_pids"]
    slow = tiny("--model.step_sleep=5", "--model.sleep_from_step=1")
    client = background(*slow, cwd=fresh(tmp_path))
    job_id = job_id_in(client.wait_for(r"job \d+ on", timeout=30))
    first_step(served, job_id)
    client.proc.send_signal(signal.SIGINT)
    client.wait_for(rf"cancelling job {job_id}", timeout=10)
    client.proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    status, out = client.finish(timeout=10)
    assert status == 130 and time.monotonic() - started < 2, out
    assert f"job {job_id} is being cancelled" in out, out  # it stopped waiting: the job had not ended
    job = wait_for_state(served.client(), job_id, {"cancelled", "failed", "succeeded"}, timeout=30)
    assert job["state"] == "cancelled" and job["error"] is None, job
    assert served.info()["rank_pids"] == ranks  # the 5 s step was not cut short: nobody was replaced
    after = lightdist(*tiny(), state_dir=served.state_dir, cwd=fresh(tmp_path))
    assert after.returncode == 0, after.stdout + after.stderr


def test_the_progress_bar_redraws_in_place_in_a_terminal(served: RunningServer, tmp_path: Path) -> None:
    """tqdm in a pty, as Lightning's TQDMProgressBar draws it: one training bar redrawn in place
    across the epochs (no line left per epoch), a validation bar under it while validation runs."""
    bar = "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"
    out = in_terminal(["fit", *TINY, "--trainer.max_epochs=2", bar, "--server"], served.state_dir, tmp_path)
    shown = [line for line in Screen.of(out, COLUMNS) if line.startswith(("Epoch", "Validation", "Sanity"))]
    assert len(shown) == 1, shown  # 64 samples / 8 per batch / 2 ranks: 4 batches
    assert re.fullmatch(r"Epoch 1: 100%\|█+\| 4/4 \[00:\d\d<00:00, +[\d.]+it/s, train_loss=\d\.\d\d\d\]", shown[0]), (
        shown
    )
    assert out.count("\rEpoch 0") >= 2, out  # drawn, then redrawn over itself
    frames = [[line.split(":")[0] for line in lines if line] for lines in Screen.frames(out, COLUMNS)]
    assert any(["Epoch 0", "Validation DataLoader 0"] == lines[-2:] for lines in frames), out
    assert "lightdist: fit metrics: " in out


def test_the_rich_progress_bar_in_a_terminal(served: RunningServer, tmp_path: Path) -> None:
    out = in_terminal(["fit", *TINY, "--trainer.max_epochs=2", "--server"], served.state_dir, tmp_path)
    shown = [line for line in Screen.of(out, COLUMNS) if line.startswith(("Epoch", "Validation", "Sanity"))]
    assert len(shown) == 1, shown  # Lightning's RichProgressBar: one training bar, redrawn in place
    found = re.fullmatch(r"Epoch 1/1 +━+ 4/4 \d:\d\d:\d\d • \d:\d\d:\d\d [\d.]+it/s train_loss: \d\.\d\d\d", shown[0])
    assert found, shown
    assert "\x1b[" in out and "lightdist: fit metrics: " in out


COLUMNS = 100


def in_terminal(args: list[str], state_dir: Path, cwd: Path, timeout: float = 30.0) -> str:
    """Run the client with a pty as its terminal; everything it drew, once it exits 0."""
    argv = [sys.executable, "-m", "lightdist.cli", *args]
    status, out = run_in_terminal(argv, cwd=cwd, env=client_env(state_dir), columns=COLUMNS, timeout=timeout)
    assert status == 0, "\n".join(Screen.of(out, COLUMNS))
    return out


def test_jobs_lists_and_shows(served: RunningServer, tmp_path: Path) -> None:
    nothing = lightdist("jobs", "--state", "interrupted", state_dir=served.state_dir, cwd=tmp_path)
    assert nothing.returncode == 0 and nothing.stdout == "no jobs\n", nothing.stderr
    done = lightdist(
        "fit",
        "--config",
        "digits/pretrain-cpu",
        "--server",
        "--name",
        "listed",
        *QUICK,
        state_dir=served.state_dir,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    job_id = job_id_in(done.stderr)
    listed = lightdist("jobs", state_dir=served.state_dir, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "COMMAND", "CONFIG", "ELAPSED", "METRIC"]
    row = next(line.split() for line in rows if line.split()[0] == str(job_id))
    assert row[1:5] == ["listed", "succeeded", "fit", "digits/pretrain-cpu"] and row[-1].startswith("val_acc="), rows
    shown = lightdist("jobs", str(job_id), state_dir=served.state_dir, cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith(f"job {job_id} (listed): succeeded\n"), shown.stdout
    assert f"--config {CONFIGS}/digits/pretrain-cpu.yaml" in shown.stdout
    assert f"last_checkpoint  {tmp_path}/runs/digits/pretrain/checkpoints/last.ckpt" in shown.stdout
    assert "metrics   train_acc=" in shown.stdout
    as_json = json.loads(lightdist("jobs", str(job_id), "--json", state_dir=served.state_dir, cwd=tmp_path).stdout)
    assert as_json["id"] == job_id and as_json["state"] == "succeeded"
    missing = lightdist("jobs", "999999", state_dir=served.state_dir, cwd=tmp_path)
    assert missing.returncode == 1 and "no job 999999" in missing.stderr


def test_detach_then_jobs_cancel_and_follow(served: RunningServer, tmp_path: Path) -> None:
    """``--detach`` prints the id and exits; ``lightdist jobs ID --cancel`` stops the job and
    ``--follow`` replays it and exits with its status, as its own client would have."""
    detached = lightdist(
        *tiny("--model.step_sleep=0.2", "--trainer.max_epochs=50", "--detach"), state_dir=served.state_dir, cwd=tmp_path
    )
    assert detached.returncode == 0, detached.stderr
    job_id = int(detached.stdout)
    assert detached.stdout == f"{job_id}\n" and f"lightdist jobs {job_id} --follow" in detached.stderr
    first_step(served, job_id)  # nobody follows it, and it runs: detached jobs are not cancelled
    cancelled = lightdist("jobs", str(job_id), "--cancel", state_dir=served.state_dir, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"job {job_id}: running (stopping at the next batch)\n"
    followed = lightdist("jobs", str(job_id), "--follow", state_dir=served.state_dir, cwd=tmp_path)
    assert followed.returncode == 130, followed.stdout + followed.stderr  # the job's exit status
    assert "lightdist: fit on 2 rank(s)" in followed.stdout
    assert followed.stderr.rstrip().endswith(f"lightdist jobs {job_id}: job {job_id} was cancelled"), followed.stderr
    assert served.client().job(job_id)["state"] == "cancelled"
