"""The benchmark script runs end to end (tiny sizes) and prints its table. No timing is asserted:
speed targets live in the benchmark's own output (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_pool_benchmark_prints_its_table(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lightdist.bench", "pool", "--repeats", "1", "--calls", "50", "--items", "500",
         "--world-sizes", "1,2", "--json", str(out_json)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for row in ("pool start ws=2", "invoke ws=2 p50", "stream ws=2 (items/s", "stream items lost"):
        assert row in proc.stdout, proc.stdout
    data = json.loads(out_json.read_text())
    assert data  # the raw numbers are written for later comparison
    lost_line = next(line for line in proc.stdout.splitlines() if line.startswith("stream items lost"))
    assert lost_line.split()[5] == "0" and lost_line.rstrip().endswith("PASS"), lost_line


def test_recovery_benchmark_prints_its_table(tmp_path: Path) -> None:
    out_json = tmp_path / "recovery.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lightdist.bench", "recovery", "--repeats", "1", "--grace", "0.2",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = ("(a) SIGKILL during a call", "(b) after (a)", "(c) rank 1 raises", "(d) after (c)", "(e) SIGKILL while idle")
    for row in rows:
        assert row in proc.stdout, proc.stdout
    data = json.loads(out_json.read_text())
    assert data["grace_s"] == 0.2
    # What the caller saw after the kill during a call: the killed rank's death, by name.
    assert [run["error"] for run in data["kill_during_call"]] == ["WorkerDiedError(rank 0)"], data
    assert len(data["raise_in_collective"]) == len(data["kill_while_idle"]) == 1, data
