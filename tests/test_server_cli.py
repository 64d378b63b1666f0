"""The thin client (``lightdist fit ... --server``) and ``lightdist jobs`` (issue 13).

Two halves. Against :class:`tests.fake_server.FakeServer` (a scripted stand-in, no pool): the flag
grammar, the lines and exit statuses, the progress bar in a real terminal, Ctrl-C, a server that is
not there or dies mid-job, and that the client imports neither torch nor Lightning. Against a real
``lightdist serve`` (the ``served`` fixture): a digits fit end to end, bad input refused before
anything is queued, Ctrl-C cancelling only that job with the ranks kept warm, and ``lightdist jobs``.

The client runs as ``python -m lightdist.cli`` with this checkout on ``PYTHONPATH`` (the console
script in the venv may belong to another checkout).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightdist.cli._jobs import config_name, detail, main_metric, table
from lightdist.cli._remote import RemoteArgsError, RemoteOptions, progress_bar_kind, split_remote_args
from tests.cli_helpers import CONFIGS, ROOT
from tests.conftest import OWNED_ELSEWHERE
from tests.fake_server import FakeServer, Script, fit_script
from tests.server_helpers import RunningServer, start_server, stop_server

HEAVY_MODULES = ("torch", "lightning", "pytorch_lightning", "jsonargparse", "numpy")


def client_env(state_dir: Path) -> dict[str, str]:
    """The environment of a client process: this checkout first, the state dir as its default."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_STATE_HOME"}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    env["XDG_STATE_HOME"] = str(state_dir.parent)  # find_server() reads XDG_STATE_HOME/lightdist
    return env


def lightdist(*args: str | Path, state_dir: Path, cwd: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightdist.cli", *map(str, args)],
        cwd=cwd,
        env=client_env(state_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_client(*args: str | Path, state_dir: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lightdist.cli", *map(str, args)],
        cwd=cwd,
        env=client_env(state_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """The client's output up to and including the first line that matches ``pattern``."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output so far:\n{seen}")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "lightdist"


def fake(state_dir: Path, script: Script, **kwargs: bool) -> Iterator[FakeServer]:
    server = FakeServer(state_dir, script, **kwargs)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fake_fit(state_dir: Path) -> Iterator[FakeServer]:
    yield from fake(state_dir, fit_script())


@pytest.fixture
def fake_held(state_dir: Path) -> Iterator[FakeServer]:
    """A fit that runs until it is cancelled, then finishes as cancelled."""
    script = fit_script(exit_code=130)
    yield from fake(state_dir, [*script[:6], ("hold", {}), *script[-3:]])


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


# --- against the scripted server -----------------------------------------------------------------


def test_a_fit_through_the_server_prints_as_a_local_run(fake_fit: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    done = lightdist(
        "fit", "--config", "digits/pretrain-cpu", "--server", "--name", "q", state_dir=state_dir, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "lightdist: fit on 2 rank(s)" in done.stdout and "lightdist: fit metrics: " in done.stdout
    assert f"job 1 on {fake_fit.url}" in done.stderr
    sent = fake_fit.jobs[1]
    assert sent["command"] == "fit" and sent["name"] == "q" and sent["attach"] is True and sent["cwd"] == str(tmp_path)
    assert sent["args"] == ["--config", str(CONFIGS / "digits/pretrain-cpu.yaml")]  # a name made a path


def test_the_client_imports_neither_torch_nor_lightning(fake_fit: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "lightdist.cli",
            "fit",
            "--config",
            "digits/pretrain-cpu",
            "--server",
        ],
        cwd=tmp_path,
        env=client_env(state_dir),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "lightdist.cli._remote" in imported and "lightdist._progress" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY_MODULES)
    assert not heavy, f"the thin client imported {heavy}"


def test_bad_input_is_one_line_and_exit_2(fake_fit: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    done = lightdist("fit", "--config", "digits/pretrain-cpu", "--bad", "--server", state_dir=state_dir, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "lightdist fit: error: model.lr: Expected a <class 'float'>. Got value: fast (see: lightdist fit --help)\n"
    )
    assert fake_fit.jobs == {}


def test_a_failed_rank_prints_its_traceback_and_exits_1(state_dir: Path, tmp_path: Path) -> None:
    error = {
        "type": "ValueError",
        "message": "rank 1 failed: ValueError: boom",
        "traceback": "Traceback ...\nValueError: boom\n",
    }
    for _ in fake(state_dir, fit_script(epochs=1, exit_code=1, error=error)):
        done = lightdist("fit", "--server", state_dir=state_dir, cwd=tmp_path)
    assert done.returncode == 1
    assert "lightdist fit: rank 1 failed: ValueError: boom\nTraceback ...\nValueError: boom\n" in done.stderr


def test_detach_prints_the_job_id_and_exits(fake_fit: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    done = lightdist("fit", "--server", fake_fit.url, "--detach", state_dir=state_dir, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == "1\n"
    assert "lightdist jobs 1 --follow" in done.stderr and fake_fit.jobs[1]["attach"] is False


def test_no_server_is_one_line_and_exit_1(state_dir: Path, tmp_path: Path) -> None:
    done = lightdist("fit", "--config", "digits/pretrain-cpu", "--server", state_dir=state_dir, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "no lightdist server is running" in done.stderr and "lightdist serve" in done.stderr
    refused = lightdist("jobs", "--server", "http://127.0.0.1:9/?token=t", state_dir=state_dir, cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "http://127.0.0.1:9" in refused.stderr and "lightdist serve" in refused.stderr


def test_ctrl_c_cancels_the_job_and_exits_130(fake_held: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    client = start_client("fit", "--server", state_dir=state_dir, cwd=tmp_path)
    try:
        read_until(client, r"lightdist: fit on", timeout=20)  # the job runs: events are arriving
        client.send_signal(signal.SIGINT)
        out = client.communicate(timeout=20)[0]
    finally:
        client.kill()
    assert client.returncode == 130, out
    assert fake_held.cancels == [1]
    assert "cancelling job 1" in out and out.rstrip().endswith("lightdist fit: interrupted")


def test_a_second_ctrl_c_stops_waiting_at_once(state_dir: Path, tmp_path: Path) -> None:
    for server in fake(state_dir, [*fit_script()[:4], ("hold", {})], ignore_cancel=True):
        client = start_client("fit", "--server", state_dir=state_dir, cwd=tmp_path)
        try:
            read_until(client, r"lightdist: fit on", timeout=20)
            client.send_signal(signal.SIGINT)
            read_until(client, r"cancelling job 1", timeout=10)
            client.send_signal(signal.SIGINT)
            started = time.monotonic()
            out = client.communicate(timeout=10)[0]
        finally:
            client.kill()
        assert client.returncode == 130 and time.monotonic() - started < 2, out
        assert server.cancels == [1] and "job 1 is being cancelled" in out


def test_a_server_that_dies_mid_job_is_one_line_within_2_s(state_dir: Path, tmp_path: Path) -> None:
    for server in fake(state_dir, [*fit_script()[:4], ("hold", {})]):
        client = start_client("fit", "--server", state_dir=state_dir, cwd=tmp_path)
        try:
            read_until(client, r"lightdist: fit on", timeout=20)
            server.kill()
            killed = time.monotonic()
            out = client.communicate(timeout=10)[0]
        finally:
            client.kill()
        assert client.returncode == 1 and time.monotonic() - killed < 2, out
        last = out.rstrip().splitlines()[-1]
        assert last.startswith("lightdist fit: error: ") and server.url in last, out


def test_the_progress_bar_redraws_in_place_in_a_terminal(fake_fit: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    """tqdm in a pty: each epoch's bar is redrawn with carriage returns and ends on one full line."""
    out = in_terminal(
        ["fit", "--server", "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], state_dir, tmp_path
    )
    assert "\r" in out
    final_lines = [line for line in out.split("\n") if "Epoch" in line]
    assert len(final_lines) == 2, out  # one line per epoch, the bar's redraws joined by \r
    for epoch, line in enumerate(final_lines):
        assert line.count(f"\rEpoch {epoch}") >= 2, line  # drawn, then redrawn over itself
        assert "3/3" in line.split("\r")[-1], line
    assert "lightdist: fit metrics: " in out


def test_the_rich_progress_bar_in_a_terminal(fake_fit: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    out = in_terminal(["fit", "--server"], state_dir, tmp_path)
    assert "\x1b[" in out and "Epoch 0" in out and "Epoch 1" in out and "3/3" in out, out
    assert "lightdist: fit metrics: " in out


def in_terminal(args: list[str], state_dir: Path, cwd: Path, timeout: float = 30.0) -> str:
    """Run the client with a pty as its terminal; everything it drew, once it exits 0."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightdist.cli", *args],
        cwd=cwd,
        env={**client_env(state_dir), "TERM": "xterm"},
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the child's side closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=5) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        proc.kill()
        os.close(main)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_jobs_lists_and_shows(fake_fit: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    assert lightdist("jobs", state_dir=state_dir, cwd=tmp_path).stdout == "no jobs\n"
    lightdist(
        "fit", "--config", "digits/pretrain-cpu", "--server", "--name", "quick", state_dir=state_dir, cwd=tmp_path
    )
    listed = lightdist("jobs", state_dir=state_dir, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "COMMAND", "CONFIG", "ELAPSED", "METRIC"]
    assert row.split()[:5] == ["1", "quick", "succeeded", "fit", "digits/pretrain-cpu"]
    shown = lightdist("jobs", "1", state_dir=state_dir, cwd=tmp_path)
    assert shown.stdout.startswith("job 1 (quick): succeeded\n") and "--config " in shown.stdout
    as_json = json.loads(lightdist("jobs", "1", "--json", state_dir=state_dir, cwd=tmp_path).stdout)
    assert as_json["id"] == 1
    missing = lightdist("jobs", "9", state_dir=state_dir, cwd=tmp_path)
    assert missing.returncode == 1 and "no job 9" in missing.stderr


def test_jobs_cancel_and_follow_a_detached_job(fake_held: FakeServer, state_dir: Path, tmp_path: Path) -> None:
    detached = lightdist("fit", "--server", "--detach", state_dir=state_dir, cwd=tmp_path)
    assert detached.returncode == 0 and detached.stdout == "1\n"
    cancelled = lightdist("jobs", "1", "--cancel", state_dir=state_dir, cwd=tmp_path)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith("job 1: ") and fake_held.cancels == [1]
    followed = lightdist("jobs", "1", "--follow", state_dir=state_dir, cwd=tmp_path)
    assert followed.returncode == 130, followed.stderr  # the job's exit status, as its own client would
    assert (
        "lightdist: fit on 2 rank(s)" in followed.stdout and "lightdist jobs 1: job 1 was cancelled" in followed.stderr
    )


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
    row = table([job]).splitlines()[1].split()
    assert row == ["7", "-", "failed", "fit", "digits/pretrain-cpu", "12.0s", "val_acc=0.875"]
    shown = detail(job)
    assert "ran 12.0s" in shown and "waited 0.5s" in shown and "log_dir" in shown
    assert "error     ValueError (rank 1): boom" in shown and shown.endswith("Traceback (most recent call last):\n...")


# --- against a real `lightdist serve` ----------------------------------------------------------------

QUICK = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real server for the module (a start costs seconds), in a state dir that bare ``--server``
    finds through ``XDG_STATE_HOME``."""
    running = start_server(tmp_path_factory.mktemp("served") / "state" / "lightdist")
    owned = running.owned
    OWNED_ELSEWHERE.append(owned)
    try:
        yield running
    finally:
        OWNED_ELSEWHERE.remove(owned)
        assert stop_server(running) == 0, running.output()


def test_a_digits_fit_on_a_real_server(served: RunningServer, tmp_path: Path) -> None:
    done = lightdist(
        "fit", "--config", "digits/pretrain-cpu", "--server", *QUICK, state_dir=served.state_dir, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr + served.output()
    assert "lightdist: fit on 2 rank(s), CPUAccelerator, PoolStrategy" in done.stdout
    assert re.search(r"^lightdist: fit metrics: .*val_acc=", done.stdout, re.M), done.stdout
    assert (
        f"Final checkpoint: {tmp_path}/runs/digits/pretrain/checkpoints/last.ckpt" in done.stdout
    )  # cwd: the client's
    assert (tmp_path / "runs/digits/pretrain/checkpoints/last.ckpt").is_file()


def test_bad_input_on_a_real_server_queues_nothing(served: RunningServer, tmp_path: Path) -> None:
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


def test_ctrl_c_cancels_only_that_job_and_the_ranks_stay_warm(served: RunningServer, tmp_path: Path) -> None:
    client = served.client()
    ranks = client.info()["rank_pids"]
    long_fit = ["fit", "--config", "digits/pretrain-cpu", "--server", "--trainer.max_epochs=200", "--name", "long"]
    proc = start_client(*long_fit, "--trainer.enable_progress_bar=false", state_dir=served.state_dir, cwd=tmp_path)
    try:
        job_id = int(re.search(r"job (\d+) on", read_until(proc, r"job \d+ on", timeout=30)).group(1))  # type: ignore[union-attr]
        next(kind for _, kind, _ in client.events(job_id) if kind == "train_batch")  # it is training
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert out.rstrip().endswith("lightdist fit: interrupted"), out
    assert client.job(job_id)["state"] == "cancelled"
    assert client.info()["rank_pids"] == ranks  # the pool stayed warm: the same processes
    after = lightdist(
        "fit", "--config", "digits/pretrain-cpu", "--server", *QUICK, state_dir=served.state_dir, cwd=tmp_path
    )
    assert after.returncode == 0, after.stdout + after.stderr
    assert client.info()["rank_pids"] == ranks


def test_jobs_on_a_real_server(served: RunningServer, tmp_path: Path) -> None:
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
    job_id = served.client().jobs(limit=1)[0]["id"]
    listed = lightdist("jobs", state_dir=served.state_dir, cwd=tmp_path).stdout.splitlines()
    row = next(line.split() for line in listed if line.split()[0] == str(job_id))
    assert row[1:5] == ["listed", "succeeded", "fit", "digits/pretrain-cpu"] and row[-1].startswith("val_acc="), listed
    shown = lightdist("jobs", str(job_id), state_dir=served.state_dir, cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith(f"job {job_id} (listed): succeeded\n"), shown.stdout
    assert f"last_checkpoint  {tmp_path}/runs/digits/pretrain/checkpoints/last.ckpt" in shown.stdout
    assert "metrics   train_acc=" in shown.stdout
