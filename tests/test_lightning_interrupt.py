"""Ctrl-C during fit on the pool: every rank stops at the same batch within 2 s, the driver's SIGINT
handler is left alone (no SIG_IGN, no sys.exit), the pool stays warm and the next fit works."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DRIVER = r"""
import signal, sys, time
import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
import lightdist

class Slow(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        time.sleep(0.01)  # ~100 steps/s: the run would take minutes
        return self.layer(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

def trainer(max_epochs):
    return L.Trainer(strategy="lightdist", accelerator="cpu", devices=2, max_epochs=max_epochs, logger=False,
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)

data = DataLoader(TensorDataset(torch.randn(512, 4)), batch_size=8)
handler = signal.getsignal(signal.SIGINT)
first = trainer(1)
first.fit(Slow(), data)                      # starts the pool
pids = first.strategy.pool().pids
print("READY", flush=True)
t = trainer(1000)
t.fit(Slow(), data)                          # interrupted by the test's SIGINT
returned = time.monotonic()
print("INTERRUPTED", t.interrupted, "STEP", t.global_step, flush=True)
print("HANDLER", signal.getsignal(signal.SIGINT) is handler, flush=True)
print("OPTIMIZERS", len(t.optimizers), flush=True)  # the interrupted fit's, fetched from rank 0
again = trainer(1)
again.fit(Slow(), data)
print("NEXT", again.global_step, "SAME PIDS", again.strategy.pool().pids == pids,
      "RECOVERIES", again.strategy.pool().stats().recoveries, flush=True)
"""


def test_sigint_during_fit(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", line + proc.stderr.read() if proc.stderr else line
        time.sleep(1.5)  # well into the long fit
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        interrupted = proc.stdout.readline()
        stopped_after = time.monotonic() - sent
        # Read the rest through the same buffered file: communicate() would read the raw pipe and
        # lose what readline() already buffered.
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        out = proc.stdout.read()
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout=30)
        watchdog.cancel()
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert interrupted.startswith("INTERRUPTED True STEP "), interrupted + err
    assert 0 < int(interrupted.split()[-1]) < 1000 * 32
    assert stopped_after < 2.0, f"fit returned {stopped_after:.2f} s after SIGINT"
    assert "HANDLER True" in out, repr(interrupted) + repr(out)
    assert "OPTIMIZERS 1" in out, out + err
    assert "NEXT 32 SAME PIDS True RECOVERIES 0" in out, out + err
