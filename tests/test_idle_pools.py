"""The shared pools of ``strategy="lightdist"`` give their ranks back: ``lightdist.shutdown()`` stops
them all, ``PoolStrategy(idle_timeout=...)`` stops one that ran nothing for that long, and the next
Trainer call starts a fresh pool. In a subprocess, like the notebook that tried ``devices=1`` and
then ``devices=2``: stopping every shared pool of the test process would cost the other modules
their warm pools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import pid_alive

DRIVER = r"""
import json, logging, threading, time
import lightdist
import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
from lightdist import PoolStrategy

logging.basicConfig(level=logging.INFO, format="LOG %(message)s")

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

def fit(strategy, devices):
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=2, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4))
    return sorted(trainer.strategy.pool().pids.values())

out = {}
out["one"] = fit("lightdist", 1)
out["two"] = fit(PoolStrategy(idle_timeout=1.5), 2)
deadline = time.monotonic() + 20
while lightdist.lightning._shared.pools.get((2, "cpu")) is not None and time.monotonic() < deadline:
    time.sleep(0.05)
out["idle_stopped_after"] = round(time.monotonic() - (deadline - 20), 2)
out["two_again"] = fit(PoolStrategy(idle_timeout=1.5), 2)   # a fresh pool
out["one_again"] = fit("lightdist", 1)     # never idle-stopped: the same ranks
out["stopped"] = lightdist.shutdown()
out["left"] = sorted(lightdist.lightning._shared.pools)
out["threads"] = sorted(t.name for t in threading.enumerate() if t.name.startswith("lightdist-idle"))
print("RESULT " + json.dumps(out), flush=True)
"""


def test_idle_timeout_and_shutdown_give_the_ranks_back(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert len(out["one"]) == 1 and len(out["two"]) == 2
    # Stopped once idle for 1.5 s (polled from the end of the fit; generous for a loaded machine).
    assert out["idle_stopped_after"] < 15, out
    assert not set(out["two_again"]) & set(out["two"]), "a fresh pool after the idle stop"
    assert out["one_again"] == out["one"], "the pool without idle_timeout stayed warm"
    assert out["stopped"] == 2 and out["left"] == [] and out["threads"] == []
    for pid in out["one"] + out["two"] + out["two_again"]:
        assert not pid_alive(pid), f"rank {pid} outlived its pool"
    # Starting a second layout says the first stays warm, and how to free it.
    assert "stays warm beside it (lightdist.shutdown()" in done.stderr
    assert "stopping the idle pool of 2 cpu rank(s) after 1.5 s" in done.stderr
