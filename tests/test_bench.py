"""The benchmark script runs end to end (tiny sizes) and prints its table. No timing is asserted:
speed targets live in the benchmark's own output (docs/benchmarks.md).

One test runs the real ``python -m lightdist.bench`` command; the others call its ``main`` in this
process (what ``__main__`` calls), since a subprocess would pay ~5-9 s of ``import torch, lightning``
per benchmark before running anything. The children each benchmark starts (pools, ``ddp_spawn``,
the warm ``ddp`` script, per-contender children) are real processes either way."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import lightning  # noqa: F401  (sets PYTORCH_NVML_* and TORCHINDUCTOR_* when first imported: not in a checked test)
import pytest

from lightdist.bench.cli import main as bench_main

# Each benchmark below starts several interpreters that import torch and Lightning: minutes on a
# loaded 2-core machine (they ran in subprocesses with timeouts of 110-240 s before).
pytestmark = pytest.mark.timeout(300)


def bench(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``python -m lightdist.bench *argv`` in this process; its stdout. The process's SIGTERM handler
    is as it was (models and optimizer-state set their own while they run)."""
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)
    assert bench_main(list(argv)) == 0
    assert signal.getsignal(signal.SIGTERM) is handler
    return capsys.readouterr().out


def test_pool_benchmark_prints_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "bench.json"
    args = ("--repeats", "1", "--calls", "50", "--items", "500", "--world-sizes", "1,2", "--json", str(out_json))
    stdout = bench(capsys, "pool", *args)
    for row in ("pool start ws=2", "invoke ws=2 p50", "stream ws=2 (items/s", "stream items lost"):
        assert row in stdout, stdout
    data = json.loads(out_json.read_text())
    assert data  # the raw numbers are written for later comparison
    lost_line = next(line for line in stdout.splitlines() if line.startswith("stream items lost"))
    assert lost_line.split()[5] == "0" and lost_line.rstrip().endswith("PASS"), lost_line


def test_recovery_benchmark_prints_its_table(tmp_path: Path) -> None:
    # The real console command (python -m lightdist.bench), once: the cheapest benchmark.
    out_json = tmp_path / "recovery.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightdist.bench",
            "recovery",
            "--repeats",
            "1",
            "--grace",
            "0.2",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    rows = (
        "(a) SIGKILL during a call",
        "(b) after (a)",
        "(c) rank 1 raises",
        "(d) after (c)",
        "(e) SIGKILL while idle",
    )
    for row in rows:
        assert row in proc.stdout, proc.stdout
    data = json.loads(out_json.read_text())
    assert data["grace_s"] == 0.2
    # What the caller saw after the kill during a call: the killed rank's death, by name.
    assert [run["error"] for run in data["kill_during_call"]] == ["WorkerDiedError(rank 0)"], data
    assert len(data["raise_in_collective"]) == len(data["kill_while_idle"]) == 1, data


@pytest.fixture
def restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """ddp_spawn sets these in the driver (this process): put them back after the test."""
    for key in ("MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


def test_lightning_benchmark_prints_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_env: None
) -> None:
    # One fit per contender (each ddp_spawn fit starts and imports two processes): the throughput
    # fit after it is the warm pool's and the warm ddp group's second fit.
    out_json = tmp_path / "lightning.json"
    args = ("--fits", "1", "--steps", "2", "--throughput-steps", "11", "--throughput-repeats", "1")
    stdout = bench(capsys, "lightning", *args, "--json", str(out_json))
    rows = (
        "pool fit 1, includes pool start",
        "ddp_spawn fit, fit 1",
        "ddp_spawn runs died at exit",
        "pool fit, fit 1",
        "warm ddp fit 1",
        "pool training, 1 steps (steps/s)",
    )
    for row in rows:
        assert row in stdout, stdout
    data = json.loads(out_json.read_text())
    assert len(data["pool_s"]) == len(data["ddp_s"]) == len(data["spawn_s"]) == 1, data
    # rank 0's steps/s came back: through the pool's callback_metrics and the script's result line
    assert data["pool_steps_per_s"][0] > 0 and data["ddp_steps_per_s"][0] > 0, data
    assert data["ddp_exit_code"] == 0, data


def test_fabric_benchmark_prints_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_env: None
) -> None:
    out_json = tmp_path / "fabric.json"
    stdout = bench(capsys, "fabric", "--launches", "1", "--steps", "2", "--json", str(out_json))
    for row in ("pool launch 1, includes pool start", "ddp_spawn launch, launch 1"):
        assert row in stdout, stdout
    data = json.loads(out_json.read_text())
    assert len(data["pool_s"]) == len(data["spawn_s"]) == 1, data


def test_models_benchmark_prints_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One contender at a tiny size: each child imports Lightning (seconds on 2 cores), and the
    # torchrun and ddp_spawn children would add several more imports each.
    out_json = tmp_path / "models.json"
    args = ("--sizes", "1M", "--fits", "1", "--variants", "full", "--contenders", "pool-new")
    stdout = bench(capsys, "models", *args, "--json", str(out_json))
    for row in ("1M full: pool, new model per fit, median of 1 (s)", "1M full: pool, new model per fit, peak PSS (GB)"):
        assert row in stdout, stdout
    [result] = json.loads(out_json.read_text())["results"]
    assert result["error"] is None and len(result["seconds"]) == 1, result
    # driver, template and two ranks, each with torch loaded: well above one bare interpreter
    assert result["peak_gb"] > 0.1, result


def test_optimizer_state_benchmark_prints_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The contender that fetches and saves in the driver only: one child, one pool.
    out_json = tmp_path / "optstate.json"
    args = ("--size", "1M", "--fits", "1", "--contenders", "pool-save", "--json", str(out_json))
    stdout = bench(capsys, "optimizer-state", *args)
    for row in ("save_checkpoint incl. the fetch, median of 1 (s)", "the fetch), median of 1 (s)"):
        assert row in stdout, stdout
    result = json.loads(out_json.read_text())["results"]["pool-save"]
    assert len(result["fit_s"]) == len(result["save_s"]) == 1 and result["idle_gb"] > 0.1, result


def test_models_benchmark_refuses_a_bad_lora_base_before_running_anything(capsys: pytest.CaptureFixture[str]) -> None:
    # The script's own main, in-process (a subprocess costs ~9 s of imports for one refusal): the
    # refusal is a SystemExit with the message, raised before any contender's child is started.
    with pytest.raises(SystemExit) as exc:
        bench_main(["models", "--lora", "--lora-base", "big"])
    assert exc.value.code not in (0, None)
    assert "--lora-base: expected tiny or WIDTHxLAYERS" in str(exc.value.code)
    out = capsys.readouterr().out
    assert "median" not in out and "lightdist.bench models:" not in out  # no contender ran, not even the header


def test_payload_benchmark_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    stdout = bench(capsys, "payload", "--mb", "8", "--calls", "1")
    for mode in ("auto", "frames", "in-band"):
        assert f"{mode}: call with 8 MB there and back, median (s)" in stdout, stdout
        assert f"{mode}: peak PSS of driver + template + ranks (GB)" in stdout, stdout
