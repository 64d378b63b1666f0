"""The GPU proof kit itself (``python -m lightdist.bench gpu``, docs/gpu.md), on any machine: its dry run,
its budget and time limits (parts that are tiny ``python -c`` processes), reading pytest's lines, and
two real parts rehearsed on CPU ranks. No timing is judged beyond "the limit was enforced"."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightdist.bench.gpu import MIN_PART_S, Part, child_env, parse_marker, parse_pytest, run_parts
from lightdist.bench.gpu_parts import MARK, ROW_MARK
from tests.conftest import pid_alive, wait_until

HAS_CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0


def kit(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightdist.bench", "gpu", *args], capture_output=True, text=True, timeout=timeout
    )


def test_dry_run_imports_every_part_and_exits_0(tmp_path: Path) -> None:
    # Without CUDA the plain command is the dry run; on a GPU machine --dry-run asks for it.
    proc = kit("--out", str(tmp_path / "r.md"), *(["--dry-run"] if HAS_CUDA else []), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("dry run (--dry-run)" if HAS_CUDA else "no CUDA device: dry run") in proc.stdout
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["mode"] == "dry run" and [p["key"] for p in raw["parts"]] == list("abcdefgh")
    assert all(p["status"].startswith("dry run: importable") for p in raw["parts"]), raw["parts"]
    table = (tmp_path / "r.md").read_text()
    assert "| part | check | status | seconds (used / budget) | results |" in table and table in proc.stdout


def fake(key: str, code: str, budget: float = 30.0, skip: str | None = None) -> Part:
    return Part(key, f"fake {key}", budget, (sys.executable, "-c", code), parse_marker, skip=skip)


def test_budget_time_limits_and_skips(tmp_path: Path) -> None:
    passed = json.dumps({"status": "passed", "rows": [["x", "1"]]})
    sleeper = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    )
    hangs = f"{sleeper}; print({ROW_MARK!r} + '[\"child\", \"' + str(p.pid) + '\"]', flush=True); time.sleep(60)"
    parts = [
        fake("p", f"print({MARK + passed!r})"),
        fake("x", f"print({MARK + passed!r}); raise SystemExit(2)"),
        fake("e", "raise SystemExit(3)"),
        fake("s", "raise SystemExit(4)", skip="not selected"),
        fake("t", hangs, budget=5.0),  # killed at its limit, with the child it started
        fake("b", f"print({MARK + passed!r})"),  # less than MIN_PART_S is left by now
    ]
    deadline = time.monotonic() + MIN_PART_S + 4
    results = {r["key"]: r for r in run_parts(parts, deadline, tmp_path, child_env())}
    assert results["p"]["status"] == "passed" and results["p"]["rows"] == [["x", "1"]]
    assert results["x"]["status"] == "failed: exit 2"
    assert results["e"]["status"] == "error: exit 3, no result line" and "log_tail" in results["e"]
    assert results["s"]["status"] == "skipped: not selected"
    assert results["t"]["status"] == "timeout: killed after 5 s" and 4.5 < results["t"]["elapsed_s"] < 30
    child = int(results["t"]["rows"][0][1])  # the rows printed before the kill are kept
    assert wait_until(lambda: not pid_alive(child), 10), "the part's own child outlived the kill"
    assert results["b"]["status"] == "skipped: budget"


def test_pytest_lines_are_counted_even_when_pytest_was_killed() -> None:
    log = """tests/test_gpu.py::test_a PASSED                     [ 25%]
tests/test_gpu.py::test_b[bf16-mixed] FAILED         [ 50%]
tests/test_gpu.py::test_c SKIPPED (needs 2 CUDA GPUs) [ 75%]
tests/test_gpu.py::test_d """
    found = parse_pytest(log, -9)
    assert found["status"] == "failed" and found["rows"] == [["tests", "1 failed, 1 passed, 1 skipped"]]
    assert found["failed_checks"] == ["test_b[bf16-mixed]"]
    skipped = parse_pytest("tests/test_gpu.py::test_c SKIPPED (needs a CUDA GPU) [100%]\n", 0)
    assert skipped["status"] == "skipped: every test skipped"


@pytest.mark.timeout(300)
@pytest.mark.heavy  # minutes on 2 cores; the dry run and the budget logic run in CI
def test_cpu_rehearsal_of_the_pool_and_kill_parts(tmp_path: Path) -> None:
    proc = kit("--rehearse-on-cpu", "--parts", "b,f", "--out", str(tmp_path / "r.md"), timeout=280)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    parts = {p["key"]: p for p in json.loads((tmp_path / "r.json").read_text())["parts"]}
    assert parts["b"]["status"] == parts["f"]["status"] == "passed", parts
    assert {parts[k]["status"] for k in "acdegh"} == {"skipped: not selected"}
    assert [row[0] for row in parts["f"]["rows"]][:2] == [
        "SIGKILL -> WorkerDiedError (s)",
        "WorkerDiedError -> next call ok (s)",
    ]
    assert (tmp_path / "r-logs" / "b.log").is_file()
