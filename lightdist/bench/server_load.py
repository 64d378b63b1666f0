"""``python -m lightdist.bench server --clients 50``: many event-stream clients and a long queue.

One job steps at a steady rate (:class:`Ticker`, ``--steps`` steps of ``--step-sleep`` s) while
``--clients`` clients follow its event stream, each on its own connection (as that many dashboards
or ``lightdist fit --server`` clients would), and ``--queued`` jobs are submitted behind it and then
cancelled. Reported: events lost or repeated for any client (each client's ids are compared with a
replay of the finished job; the target is 0), event delivery latency (the event's ``time``, stamped
by the server when it stored the event, to the moment a client parsed it; same host, same clock),
submit and cancel latency of the queued jobs, and the server process's resident memory before,
during (peak) and after. The clients are threads of this process: their parsing shares one
interpreter, so the latency is an upper bound on what separate clients would see.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightdist.bench.common import Row, format_table, machine, percentile, verdict
from lightdist.server._client import Client, Server, ServerError, find_server

__all__ = ["Follower", "Ticker", "TickerData", "follow", "run_server_load", "ticker_args"]


class Ticker(pl.LightningModule):
    """A linear model whose training steps take ``step_sleep`` seconds: a steady event rate."""

    def __init__(self, step_sleep: float = 0.02) -> None:
        super().__init__()
        self.step_sleep = step_sleep
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_sleep)
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TickerData(pl.LightningDataModule):
    def __init__(self, size: int = 8192, batch_size: int = 8) -> None:
        super().__init__()
        x = torch.randn(size, 4, generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, x.sum(dim=1, keepdim=True))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size)


def ticker_args(steps: int, step_sleep: float) -> list[str]:
    """A fit of ``steps`` steps (a validation every 50) with nothing written to disk."""
    return [
        "--model",
        "lightdist.bench.server_load.Ticker",
        f"--model.step_sleep={step_sleep}",
        "--data",
        "lightdist.bench.server_load.TickerData",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={min(50, steps)}",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


@dataclass
class Follower:
    """One client's view of a job's stream: every event id, and the delivery latency of the events
    stored after it connected."""

    ids: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    error: str | None = None


def follow(server: Server, job_id: int, clients: int, timeout: float = 300.0) -> list[Follower]:
    """``clients`` threads, each following the job's events to its ``finished`` event; waits for
    them (at most ``timeout`` s) and returns what each saw."""
    followers = [Follower() for _ in range(clients)]
    connected = threading.Barrier(clients + 1)

    def run(follower: Follower) -> None:
        try:
            with Client(server, timeout=30) as client:
                client.info()  # connected and authenticated before the clock starts
                connected.wait(30)
                since = time.time()
                for event_id, _, data in client.events(job_id):
                    now = time.time()
                    follower.ids.append(event_id)
                    if data["time"] >= since:
                        follower.latencies.append(now - data["time"])
        except Exception as exc:  # noqa: BLE001 - reported, and counted as lost events
            follower.error = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(f,), name=f"bench-follower-{i}") for i, f in enumerate(followers)]
    for thread in threads:
        thread.start()
    connected.wait(60)
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"event-stream clients of job {job_id} did not finish within {timeout} s")
    return followers


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait_finished(client: Client, job_id: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if job["state"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} did not finish within {timeout} s")
        time.sleep(0.1)


def _fresh(scratch: Path) -> str:
    """A new directory per job: Lightning refuses to overwrite a run's config.yaml."""
    return tempfile.mkdtemp(prefix="job-", dir=scratch)


def _submit_queue(client: Client, scratch: Path, count: int) -> tuple[list[float], list[float], bool]:
    """Submit ``count`` jobs behind the running one, check their queue positions, cancel them."""
    submit_s, ids = [], []
    for _ in range(count):
        started = time.perf_counter()
        ids.append(client.submit("fit", ticker_args(1, 0.0), cwd=_fresh(scratch))["id"])
        submit_s.append(time.perf_counter() - started)
    positions = [client.job(job_id)["position"] for job_id in ids]
    in_order = positions == list(range(1, count + 1))
    cancel_s = []
    for job_id in reversed(ids):  # the last first: nothing behind the running job starts meanwhile
        started = time.perf_counter()
        try:
            client.cancel(job_id)
        except ServerError:
            continue  # it ran already (the streamed job ended first): nothing to cancel
        cancel_s.append(time.perf_counter() - started)
    return submit_s, cancel_s, in_order


def run_server_load(args: argparse.Namespace) -> dict[str, Any]:
    from lightdist.bench.server import _start_server

    scratch = Path(tempfile.mkdtemp(prefix="lightdist-bench-server-load-"))
    state_dir = scratch / "state"
    proc, _ = _start_server(state_dir, 2)
    try:
        server = find_server(state_dir=state_dir)
        client = Client(server, timeout=60)
        warm_up = client.submit("fit", ticker_args(5, 0.0), cwd=_fresh(scratch))
        _wait_finished(client, warm_up["id"], 120)  # the first job imports the model in the ranks
        rss_before = _rss_mib(proc.pid)
        peak = rss_before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.1):
                peak = max(peak, _rss_mib(proc.pid))

        sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
        sampler.start()
        job = client.submit("fit", ticker_args(args.steps, args.step_sleep), cwd=_fresh(scratch), name="streamed")
        queue_result: list[tuple[list[float], list[float], bool]] = []
        queuer = threading.Thread(
            target=lambda: queue_result.append(_submit_queue(Client(server, timeout=60), scratch, args.queued))
        )
        started = time.perf_counter()
        queuer.start()
        followers = follow(server, job["id"], args.clients)
        elapsed = time.perf_counter() - started
        queuer.join(120)
        done.set()
        sampler.join(5)
        rss_after = _rss_mib(proc.pid)
        finished = _wait_finished(client, job["id"], 60)
        reference = [event_id for event_id, _, _ in client.events(job["id"])]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    lost = sum(len(set(reference) - set(f.ids)) for f in followers)
    repeated = sum(len(f.ids) - len(set(f.ids)) for f in followers)
    exact = sum(f.ids == reference for f in followers)
    latencies = [x * 1000 for f in followers for x in f.latencies]
    submit_s, cancel_s, in_order = queue_result[0] if queue_result else ([], [], False)
    rows = [
        Row("clients following one job", str(args.clients)),
        Row("events in the job (replay)", str(len(reference))),
        Row("events lost, all clients", str(lost), target="0", verdict=verdict(lost == 0)),
        Row("events repeated, all clients", str(repeated), target="0", verdict=verdict(repeated == 0)),
        Row("clients with the exact replay", f"{exact}/{args.clients}", verdict=verdict(exact == args.clients)),
        Row("client errors", str(sum(f.error is not None for f in followers)), target="0"),
        Row("delivery latency p50 (ms)", f"{statistics.median(latencies):.1f}" if latencies else "-"),
        Row("delivery latency p99 (ms)", f"{percentile(latencies, 99):.1f}" if latencies else "-"),
        Row("delivery latency max (ms)", f"{max(latencies):.1f}" if latencies else "-"),
        Row("events delivered per second", f"{len(latencies) / elapsed:.0f}"),
        Row(f"{args.queued} queued: positions 1..N", str(in_order), verdict=verdict(in_order)),
        Row("submit p50 / p99 (ms)", _p50_p99(submit_s)),
        Row("cancel p50 / p99 (ms)", _p50_p99(cancel_s)),
        Row("server RSS before / peak / after (MiB)", f"{rss_before:.0f} / {peak:.0f} / {rss_after:.0f}"),
        Row("streamed job", finished["state"]),
    ]
    print(format_table(rows), flush=True)
    errors = [f.error for f in followers if f.error]
    if errors:
        print(f"first client error: {errors[0]}")
    return {
        "machine": machine(),
        "clients": args.clients,
        "events": len(reference),
        "lost": lost,
        "repeated": repeated,
        "exact_clients": exact,
        "latency_ms": {"p50": statistics.median(latencies), "p99": percentile(latencies, 99), "max": max(latencies)}
        if latencies
        else {},
        "submit_ms": _ms(submit_s),
        "cancel_ms": _ms(cancel_s),
        "queue_in_order": in_order,
        "rss_mib": {"before": rss_before, "peak": peak, "after": rss_after},
        "errors": errors,
    }


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values) * 1000, "p99": percentile(values, 99) * 1000} if values else {}


def _p50_p99(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} / {percentile(values, 99) * 1000:.1f}" if values else "-"
