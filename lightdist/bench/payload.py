"""``payload``: a plain ``DistributedRunner`` call carrying a large tensor there and back.

Run: ``python -m lightdist.bench payload [--mb 500] [--calls 3]``.

Each contender is a child process (``python -m lightdist.bench.payload --child MODE --mb N``) that
starts a 2-rank pool, makes one untimed warm-up call and ``--calls`` timed calls of
``invoke_sync({"x": <N MB float32 tensor>})``; rank 0 returns the tensor it received, so N MB travel
each way. The bench process samples the peak PSS of the child's whole tree (driver, template,
ranks) with ``bench.models.TreeSampler``. Contenders: ``auto`` (shared memory on this host: one
memfd, ``process_vm_readv`` back), ``frames`` (``tensor_transport="frames"``: signed zero-copy ZMQ
frames, as across hosts), and ``in-band`` (the tensor serialised with ``torch.save`` into the
payload's bytes and returned the same way, as every call carried it before tensors moved out of
band).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from lightdist.bench.common import Row, format_table, machine, verdict

MARK = "LIGHTDIST_PAYLOAD "
MODES = ("auto", "frames", "in-band")


def _child(mode: str, mb: int, calls: int) -> None:
    import torch

    from lightdist import DistributedRunner, DistributedWorker

    class Echo(DistributedWorker):
        def __call__(self, streaming: bool = False, x: Any = None, blob: bytes = b"") -> Any:
            if blob:  # in-band: deserialise, and serialise again on the way back
                tensor = torch.load(io.BytesIO(blob), weights_only=True)
                if self.rank:
                    return None
                buffer = io.BytesIO()
                torch.save(tensor, buffer)
                return buffer.getvalue()
            return None if self.rank else x

    x = torch.randn(mb * (1 << 20) // 4)
    transport = "frames" if mode == "frames" else "auto"
    times = []
    with DistributedRunner(Echo, world_size=2, tensor_transport=transport) as runner:
        for _ in range(1 + calls):
            t0 = time.perf_counter()
            if mode == "in-band":
                buffer = io.BytesIO()
                torch.save(x, buffer)
                back = torch.load(io.BytesIO(runner.invoke_sync({"blob": buffer.getvalue()}, timeout=600)))
            else:
                back = runner.invoke_sync({"x": x}, timeout=600)
            times.append(time.perf_counter() - t0)
            assert back.shape == x.shape and bool(back[-1] == x[-1])
            del back
    print(MARK + json.dumps({"seconds": times[1:], "warmup": times[0]}), flush=True)


def _run_one(mode: str, mb: int, calls: int) -> dict[str, Any]:
    from lightdist.bench.models import TreeSampler

    proc = subprocess.Popen(
        [sys.executable, "-m", "lightdist.bench.payload", "--child", mode, "--mb", str(mb), "--calls", str(calls)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = TreeSampler(proc.pid)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        sampler.stop_and_kill()
    line = next((ln for ln in out.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        return {"mode": mode, "error": f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}", "peak_gb": None}
    return {"mode": mode, "error": None, "peak_gb": sampler.peak_kib / 2**20, **json.loads(line[len(MARK) :])}


def run_payload(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    print(f"lightdist.bench payload: {info['date']}, {args.mb} MB each way, 2 CPU ranks, load {info['loadavg']}")
    results = {mode: _run_one(mode, args.mb, args.calls) for mode in MODES}
    base = results["in-band"]
    rows = []
    for mode, res in results.items():
        if res["error"]:
            rows.append(Row(f"{mode}: call with {args.mb} MB there and back (s)", res["error"]))
            continue
        median = statistics.median(res["seconds"])
        ratio = target = "-"
        ok = "info"
        if mode != "in-band" and not base["error"]:
            base_median = statistics.median(base["seconds"])
            ratio, target = f"{median / base_median:.2f}x", "< 1x"
            ok = verdict(median < base_median)
        baseline = "-" if mode == "in-band" or base["error"] else f"{statistics.median(base['seconds']):.3f} (in-band)"
        rows.append(
            Row(
                f"{mode}: call with {args.mb} MB there and back, median (s)",
                f"{median:.3f}",
                baseline,
                ratio,
                target,
                ok,
            )
        )
        rows.append(Row(f"{mode}: peak PSS of driver + template + ranks (GB)", f"{res['peak_gb']:.2f}"))
    print(format_table(rows))
    return {"machine": info, "mb": args.mb, "results": results}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightdist.bench.payload")
    parser.add_argument("--child", choices=MODES, required=True)
    parser.add_argument("--mb", type=int, required=True)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    _child(args.child, args.mb, args.calls)


if __name__ == "__main__":
    main(sys.argv[1:])
