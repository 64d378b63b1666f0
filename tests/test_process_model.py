"""Design §3: how ranks are made and what they inherit, on real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from lightdist import DistributedRunner
from tests.conftest import Echo, descendants, wait_until

REPO = Path(__file__).resolve().parents[1]

SCRIPT_WITHOUT_MAIN_GUARD = """
import sys
from lightdist import DistributedRunner, DistributedWorker

class ScriptWorker(DistributedWorker):          # defined in __main__, no `if __name__` guard
    def __call__(self, streaming=False, n=0):
        return {"double": 2 * n, "rank": self.rank, "module": type(self).__module__}

runner = DistributedRunner(ScriptWorker, world_size=2)
runner.start_sync(timeout=120)
print("RESULT", runner.invoke_sync({"n": int(sys.argv[1])}), flush=True)
runner.stop_sync()
"""


def _run_script(tmp_path: Path, body: str, *args: str, name: str = "script.py") -> subprocess.Popen[str]:
    script = tmp_path / name
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_class_in_unguarded_main_script(tmp_path: Path) -> None:
    """A script that defines its worker in __main__ with no main guard runs once, not once per rank."""
    proc = _run_script(tmp_path, SCRIPT_WITHOUT_MAIN_GUARD, "21")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    results = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert results == ["RESULT {'double': 42, 'rank': 0, 'module': '__main__'}"], out + err


def test_two_processes_each_with_a_pool(tmp_path: Path) -> None:
    """Two driver processes, each with its own pool, run side by side (no fixed ports)."""
    procs = [_run_script(tmp_path, SCRIPT_WITHOUT_MAIN_GUARD, str(n), name=f"s{n}.py") for n in (1, 2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for proc, (_out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
    assert "'double': 2," in outs[0][0] and "'double': 4," in outs[1][0]


def test_two_pools_in_one_process() -> None:
    """Two pools in one driver, called concurrently from two threads, each answer their own calls."""
    a = DistributedRunner(Echo, world_size=2)
    b = DistributedRunner(Echo, world_size=1)
    a.start_sync(timeout=120, tag="a")
    b.start_sync(timeout=120, tag="b")
    results: dict[str, list[str]] = {"a": [], "b": []}

    def hammer(runner: DistributedRunner, key: str) -> None:
        for i in range(50):
            out = runner.invoke_sync({"i": i}, timeout=30)
            results[key].append(f"{out['tag']}{out['payload']['i']}")

    try:
        threads = [threading.Thread(target=hammer, args=(r, k)) for r, k in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(50)]}
        assert set(a.pids.values()).isdisjoint(b.pids.values())
    finally:
        a.stop_sync()
        b.stop_sync()


def test_class_from_module_on_driver_side_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker importable only through a sys.path insert in the driver works in the ranks."""
    pkg = tmp_path / "userlib"
    pkg.mkdir()
    (pkg / "my_workers.py").write_text(
        textwrap.dedent(
            """
            from lightdist import DistributedWorker

            class Shout(DistributedWorker):
                def __call__(self, streaming=False, text=""):
                    import my_workers
                    return text.upper() + my_workers.SUFFIX

            SUFFIX = "!"
            """
        )
    )
    monkeypatch.syspath_prepend(str(pkg))
    import my_workers  # noqa: PLC0415 - only importable after the insert

    try:
        with DistributedRunner(my_workers.Shout, world_size=2) as runner:
            assert runner.invoke_sync({"text": "hi"}) == "HI!"
    finally:
        sys.modules.pop("my_workers", None)


def test_store_is_hosted_by_the_driver_on_a_free_port(echo_pool: DistributedRunner) -> None:
    """The rendezvous store lives in the driver process (it outlives rank restarts)."""
    port = echo_pool.stats().store_port
    assert port > 0
    listeners = Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
    assert f":{port:04X} " in listeners


def test_bootstrap_travels_over_stdin_not_argv_or_env(echo_pool: DistributedRunner) -> None:
    """The pool key never appears in a worker's command line or environment."""
    key = echo_pool._pool.key  # type: ignore[union-attr]
    template = echo_pool.stats().template_pid
    for pid in [template, *echo_pool.pids.values()]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"lightdist._template" in cmdline
        for blob in (cmdline, environ):
            assert key not in blob and key.hex().encode() not in blob


def test_ranks_are_forked_from_one_template(echo_pool: DistributedRunner) -> None:
    """Ranks are children of the template process, which is a child of the driver."""
    template = echo_pool.stats().template_pid
    for pid in echo_pool.pids.values():
        stat = Path(f"/proc/{pid}/stat").read_text()
        assert int(stat[stat.rindex(")") + 2 :].split()[1]) == template
    assert template in descendants()


def test_blocking_twins_inside_a_running_event_loop() -> None:
    """start_sync/invoke_sync/stream_sync/stop_sync work from a coroutine (a notebook cell)."""

    async def cell() -> tuple[dict, list[dict]]:
        runner = DistributedRunner(Echo, world_size=2)
        runner.start_sync(timeout=120)
        try:
            return runner.invoke_sync({"x": 1}), list(runner.stream_sync({"y": 2}))
        finally:
            runner.stop_sync()

    single, streamed = asyncio.run(cell())
    assert single["payload"] == {"x": 1} and streamed[-1]["payload"] == {"y": 2}


def test_async_api_from_a_server_thread_with_its_own_loop(echo_pool: DistributedRunner) -> None:
    """The async API works on a loop running in another thread (a FastAPI handler thread)."""
    out: list[object] = []

    def server_thread() -> None:
        async def handler() -> None:
            out.append(await echo_pool.invoke({"from": "thread"}, timeout=30))
            out.append([i async for i in echo_pool.stream({"s": 1}, timeout=30)])

        asyncio.run(handler())

    t = threading.Thread(target=server_thread)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert out[0]["payload"] == {"from": "thread"}  # type: ignore[index]
    assert out[1][-1]["payload"] == {"s": 1}  # type: ignore[index]


def test_blocking_twins_in_a_plain_script(tmp_path: Path) -> None:
    """The blocking API in a plain script, with `with runner:` doing start and stop."""
    proc = _run_script(
        tmp_path,
        """
        from lightdist import DistributedRunner, DistributedWorker

        class W(DistributedWorker):
            def __call__(self, streaming=False, n=0):
                if streaming and self.rank == 0:
                    for i in range(n):
                        self.add_streaming_result(i)
                return "end"

        with DistributedRunner(W, world_size=2) as runner:
            print("ITEMS", list(runner.stream_sync({"n": 3})), flush=True)
        """,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "ITEMS [0, 1, 2, 'end']" in out


def test_pids_are_reported_and_gone_after_stop() -> None:
    runner = DistributedRunner(Echo, world_size=2)
    runner.start_sync(timeout=120)
    pids = set(runner.pids.values())
    runner.stop_sync()
    assert wait_until(lambda: not pids & descendants(), 5)
    assert runner.pids == {}


def test_payload_object_from_a_module_added_to_sys_path_after_start(
    echo_pool: DistributedRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's sys.path is applied before its payload is unpickled, so a warm pool can take
    objects of a module the driver made importable after start()."""
    (tmp_path / "late_module.py").write_text("class Thing:\n    def __init__(self, n):\n        self.n = n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import late_module  # noqa: PLC0415

    try:
        out = echo_pool.invoke_sync({"thing": late_module.Thing(7)}, timeout=30)
        assert type(out["payload"]["thing"]).__name__ == "Thing" and out["payload"]["thing"].n == 7
    finally:
        sys.modules.pop("late_module", None)


def test_relative_cwd_is_resolved_against_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cwd="sub" means the driver's ./sub, for the template and every rank alike."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)

    class Where(Echo):
        def __call__(self, streaming: bool = False, **payload: object) -> dict[str, object]:
            return {"cwd": os.getcwd()}

    with DistributedRunner(Where, world_size=1, cwd="sub") as runner:
        assert runner.invoke_sync(timeout=30) == {"cwd": str(tmp_path / "sub")}
