"""Notebooks and scripts without a main guard (issue item): ``Trainer(strategy="lightdist")`` is built
and fits in a real Jupyter kernel with the LightningModule defined in a cell, in an interactive
interpreter (``python -i``), and in a script with no ``if __name__ == "__main__"``.

Each case runs in its own child interpreter (a kernel or a subprocess), because what is being tested
is that interpreter's ``__main__``: classes defined there travel to the ranks by value, and nothing
re-executes it. Every child gets a timeout and is killed in ``finally``; the pool's rank pids, which
the child prints, are checked to be gone afterwards (the ranks live in their own session, so a
leaked one would not necessarily show up as a descendant of this test process).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import descendants, pid_alive, wait_until

CHILD_TIMEOUT_S = 300  # per notebook cell / per subprocess; generous: other test runs share the CPUs
STEPS_PER_EPOCH = 4  # 64 samples, batch 8, 2 ranks

# The model and data every child defines in its own __main__ (cell, REPL prompt or script top level).
# No blank lines inside the class: the same text is typed at a `python -i` prompt, where a blank
# line ends the compound statement.
MODEL_AND_DATA = """\
class CellRegressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

def make_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

def weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])

def make_trainer():
    return L.Trainer(strategy="lightdist", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                     enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)

def fit_once(tag):
    model = CellRegressor()
    before = weights(model).clone()
    trainer = make_trainer()
    trainer.fit(model, make_loader())
    report = {"tag": tag, "strategy": type(trainer.strategy).__name__, "global_step": trainer.global_step,
              "changed": not torch.equal(before, weights(model)),
              "pids": sorted(trainer.strategy.pool().pids.values()),
              "class_module": type(model).__module__}
    print("RESULT " + json.dumps(report), flush=True)
    return trainer

"""

IMPORTS = """\
import json, os, sys
import torch
import lightning as L
import lightdist  # after lightning: registers Trainer(strategy="lightdist")
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.imports import _IS_INTERACTIVE
from torch.utils.data import DataLoader, TensorDataset
"""

# Lightning's refusal of a launcher that is not interactive-compatible (ddp_spawn's) in a notebook or
# `python -i`: shows that the child really counts as interactive, so the lightdist fits prove something.
TRY_DDP_SPAWN = """\
try:
    L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    print("SPAWN " + json.dumps({"raised": None}), flush=True)
except MisconfigurationException as exc:
    print("SPAWN " + json.dumps({"raised": str(exc)}), flush=True)

"""


def results(text: str, tag: str) -> list[dict[str, Any]]:
    """The JSON objects printed on lines starting with ``tag + " "``."""
    return [json.loads(line[len(tag) + 1 :]) for line in text.splitlines() if line.startswith(tag + " ")]


def check_two_fits(fits: list[dict[str, Any]]) -> None:
    """Both fits trained on 2 ranks, and the second reused the first one's warm pool."""
    assert [f["tag"] for f in fits] == ["first", "second"], fits
    for fit in fits:
        assert fit["strategy"] == "PoolStrategy"
        assert fit["global_step"] == STEPS_PER_EPOCH and fit["changed"] is True
        assert fit["class_module"] == "__main__"
        assert len(fit["pids"]) == 2
    assert fits[0]["pids"] == fits[1]["pids"], "the second Trainer reuses the warm pool"


def check_spawn_refused(spawn: list[dict[str, Any]]) -> None:
    assert len(spawn) == 1 and spawn[0]["raised"], "ddp_spawn must be refused in an interactive interpreter"
    assert "`Trainer(strategy='ddp_spawn')` is not compatible with an interactive environment" in spawn[0]["raised"]


def assert_gone(pids: Iterable[int], what: str) -> None:
    """Wait for ``pids`` to exit; kill the survivors and fail if there were any."""
    pids = set(pids)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 15.0)
    survivors = sorted(p for p in pids if pid_alive(p))
    kill(survivors)
    assert not survivors, f"{what} left processes running: {survivors}"


def kill(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_child(args: list[str], cwd: Path, stdin: str | None = None) -> tuple[int, str, str]:
    """Run a child interpreter with a timeout; it and everything it started are killed in finally."""
    proc = subprocess.Popen(
        args, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(stdin, timeout=CHILD_TIMEOUT_S)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            kill(descendants(proc.pid) | {proc.pid})
            proc.communicate()


# --- a real Jupyter kernel ---------------------------------------------------------------------------


def write_kernelspec(kernels_dir: Path) -> str:
    """A private kernelspec whose argv is this interpreter (the venv's python), by absolute path.

    Why not ``kernel_name="python3"``: that name is looked up in JUPYTER_PATH, the user's
    ``~/.local/share/jupyter/kernels`` and the system dirs before the environment's own, so on a
    machine with a user-level ``python3`` kernel the notebook would run in another interpreter (one
    without this checkout's lightdist). A spec in tmp_path under a unique name, found through a
    ``KernelSpecManager`` that looks only there, needs no ``jupyter kernelspec install`` and changes
    nothing outside the test. The notebook prints ``sys.executable`` and the test checks it.
    """
    name = "lightdist-test-kernel"
    spec_dir = kernels_dir / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lightdist test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return name


def build_notebook() -> Any:
    import nbformat

    cells = [
        # (a) imports, and what kind of interpreter this is
        IMPORTS + 'print("KERNEL " + json.dumps({"pid": os.getpid(), "executable": sys.executable, '
        '"interactive": _IS_INTERACTIVE}))',
        # (b) the LightningModule and data, defined in a cell
        MODEL_AND_DATA,
        # (c) fit on the shared pool
        'first = fit_once("first")',
        # (d) a second model on a new Trainer: the same warm ranks
        'second = fit_once("second")\n'
        'print("SAME_POOL " + json.dumps(first.strategy.pool() is second.strategy.pool()))',
        # Lightning still refuses ddp_spawn here: the kernel counts as interactive
        TRY_DDP_SPAWN,
        # (e) stop the pools
        "for r in lightdist.lightning.strategy._pools.values():\n"
        "    r.stop_sync()\n"
        'print("STOPPED " + json.dumps([r.is_alive() for r in lightdist.lightning.strategy._pools.values()]))',
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    return nb


def cell_text(cell: Any) -> str:
    """The cell's stdout (and any stream/text output), as one string."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.timeout(900)
def test_jupyter_kernel_fits_a_module_defined_in_a_cell(tmp_path: Path) -> None:
    # In the dev extra; imported here so that the other tests still run where they are missing.
    import nbclient
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernel_name = write_kernelspec(tmp_path / "kernels")
    km = KernelManager(
        kernel_name=kernel_name,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]),
        connection_file=str(tmp_path / "kernel-connection.json"),  # not in ~/.local/share/jupyter/runtime
    )
    nb = build_notebook()
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=kernel_name,
        timeout=CHILD_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's cwd
    )
    # The kernel's IPython profile in tmp_path: no user startup files, nothing written to ~/.ipython.
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    kernel_pid: int | None = None
    tree: set[int] = set()
    try:
        # cleanup_kc=True: setup_kernel shuts the kernel down (shutdown request, then kill) when the
        # block exits; without it a client given its km= leaves the kernel running.
        with client.setup_kernel(env=env, cleanup_kc=True):
            try:
                for index, cell in enumerate(nb.cells):
                    client.execute_cell(cell, index)
                    if index == 0:
                        kernel_pid = results(cell_text(cell), "KERNEL")[0]["pid"]
            finally:
                if kernel_pid is not None:
                    tree = descendants(kernel_pid) | {kernel_pid}
    finally:
        if kernel_pid is not None:
            # whatever the kernel had started, and the kernel itself, must be gone after shutdown
            assert_gone(tree, "the Jupyter kernel")

    text = "\n".join(cell_text(cell) for cell in nb.cells)
    kernel = results(text, "KERNEL")[0]
    assert kernel["executable"] == sys.executable, "the kernel runs the interpreter running the tests"
    assert kernel["interactive"] is True, "Lightning treats a Jupyter kernel as interactive"
    fits = results(text, "RESULT")
    check_two_fits(fits)
    assert results(text, "SAME_POOL") == [True]
    check_spawn_refused(results(text, "SPAWN"))
    assert results(text, "STOPPED") == [[False]]
    assert_gone(fits[0]["pids"], "the stopped pool")
    # The pool's start is said in the cell that starts it (not in later ones), as Lightning's own
    # info lines are: the ranks' imports take seconds that would otherwise pass in silence.
    first_fit, second_fit = cell_text(nb.cells[2]), cell_text(nb.cells[3])
    assert "lightdist: starting 2 ranks (cpu, gloo)...\n" in first_fit, first_fit
    assert re.search(r"lightdist: 2 ranks ready in \d+\.\d s\n", first_fit), first_fit
    assert "lightdist: starting" not in second_fit, second_fit


# --- an interactive interpreter ----------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_interactive_interpreter_fits_a_module_typed_at_the_prompt(tmp_path: Path) -> None:
    """``python -i`` with the code on a pipe: a real REPL (prompts, ``sys.ps1``, classes typed at the
    prompt with no source file), which Lightning detects as interactive through ``sys.flags.interactive``
    (``lightning.fabric.utilities.imports._IS_INTERACTIVE`` is ``hasattr(sys, "ps1") or
    sys.flags.interactive``, read once at import). ``python - < code`` would *not* count: neither is
    set. The pool is left to the interpreter's exit, as a user closing the REPL would."""
    code = (
        IMPORTS
        + 'print("REPL " + json.dumps({"ps1": hasattr(sys, "ps1"), "interactive": _IS_INTERACTIVE}), flush=True)\n'
        + MODEL_AND_DATA
        + 'first = fit_once("first")\n'
        + 'second = fit_once("second")\n'
        + "\n"
        + TRY_DDP_SPAWN
        # the pool a lightdist Trainer started in this REPL is still usable after the refusal
        + 'third = fit_once("third")\n'
    )
    rc, out, err = run_child([sys.executable, "-i", "-q"], tmp_path, stdin=code)
    assert rc == 0, err
    assert "Traceback" not in err, err
    repl = results(out, "REPL")
    assert repl == [{"ps1": True, "interactive": True}], (out, err)
    fits = results(out, "RESULT")
    check_two_fits(fits[:2])
    assert fits[2]["tag"] == "third" and fits[2]["pids"] == fits[0]["pids"] and fits[2]["changed"]
    check_spawn_refused(results(out, "SPAWN"))
    assert_gone(fits[0]["pids"], "the REPL's pool after exit")


# --- a script with no main guard ---------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_script_without_main_guard(tmp_path: Path) -> None:
    """The LightningModule at a script's top level, two fits, no ``if __name__ == "__main__"``. Every
    process that executes the script's body appends its pid to a file: only the script's own process
    may (spawn-based launchers re-run an unguarded main module in each child). The pool is stopped
    by the interpreter's exit."""
    marker = tmp_path / "body_ran_in.txt"
    script = tmp_path / "train_unguarded.py"
    script.write_text(
        IMPORTS
        + f"with open({str(marker)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n\n"
        + MODEL_AND_DATA
        + 'first = fit_once("first")\n'
        + 'second = fit_once("second")\n'
        + 'print("SCRIPT " + json.dumps({"pid": os.getpid(), "interactive": _IS_INTERACTIVE}), flush=True)\n'
    )
    rc, out, err = run_child([sys.executable, str(script)], tmp_path)
    assert rc == 0, err
    fits = results(out, "RESULT")
    check_two_fits(fits)
    script_run = results(out, "SCRIPT")
    assert script_run and script_run[0]["interactive"] is False
    assert marker.read_text().split() == [str(script_run[0]["pid"])], "the ranks must not re-run the script"
    assert_gone(fits[0]["pids"], "the script's pool after exit")
