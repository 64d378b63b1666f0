"""``lightdist serve`` and its job API, on a real server with a real pool (issue 13).

One server is shared with the other server modules (tests/conftest.py's ``SharedServer``: a start
costs ~10 s); the SIGKILL-and-restart test kills it and leaves its restarted successor to the later
tests (which SIGINT then stops, exit 0, after the last of them); ``--background`` starts its own.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest

from lightdist.server._client import BadInput, Client, ServerGone
from lightdist.server._jobs import ATTACH_GRACE_S
from tests.cli_helpers import MARK, ROOT, assert_nothing_left
from tests.conftest import SharedServer, pid_alive, wait_until
from tests.server_helpers import TINY, ClientProcess, RunningServer, wait_for_state

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def server(shared_server: RunningServer) -> RunningServer:
    """The shared server (tests/conftest.py's ``SharedServer``)."""
    return shared_server


def _raw(
    running: RunningServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    parts = urllib.parse.urlsplit(running.server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, {"raw": raw.decode(errors="replace")}


def _auth(running: RunningServer, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {running.server.token}", **more}


def _tiny(client: Client, cwd: Path, *more: str, **kwargs: Any) -> dict[str, Any]:
    """A tiny fit in a fresh directory under ``cwd`` (Lightning refuses to overwrite a run's config.yaml)."""
    directory = tempfile.mkdtemp(prefix="run", dir=cwd)  # unique also when two threads submit at once
    return client.submit("fit", [*TINY, *more], cwd=directory, **kwargs)


# --- security and hostile input ----------------------------------------------------------------
def test_every_route_needs_the_token(server: RunningServer) -> None:
    routes = [
        ("GET", "/v1/server"),
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/calls?cwd=/"),
        ("GET", "/v1/jobs/1"),
        ("POST", "/v1/jobs/1/cancel"),
        ("GET", "/v1/jobs/1/events"),
        ("GET", "/v1/jobs/1/result"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.server.token}):
            status, body = _raw(server, method, path, b"{}" if method == "POST" else None, headers)
            assert status == 401, (method, path, headers, status, body)
            assert "token" in body["message"]
        status, _ = _raw(server, method, path + ("&" if "?" in path else "?") + "token=nope")
        assert status == 401
    assert _raw(server, "GET", "/v1/server", headers=_auth(server))[0] == 200
    assert _raw(server, "GET", f"/v1/server?token={server.server.token}")[0] == 200
    token_file = server.state_dir / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert server.state_dir.stat().st_mode & 0o077 == 0


def test_hostile_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(
    server: RunningServer, tmp_path: Path
) -> None:
    json_headers = _auth(server, **{"Content-Type": "application/json"})
    good = {"command": "fit", "args": TINY, "cwd": str(tmp_path)}
    cases: list[tuple[str, str, bytes | None, int, str]] = [
        ("POST", "/v1/jobs", b"{not json", 400, "not JSON"),
        ("POST", "/v1/jobs", b"\xff\xfe\x00", 400, "not JSON"),
        ("POST", "/v1/jobs", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/jobs", json.dumps({**good, "evil": 1}).encode(), 400, "unknown field"),
        ("POST", "/v1/jobs", json.dumps({**good, "command": "rm"}).encode(), 400, "command must be"),
        ("POST", "/v1/jobs", json.dumps({**good, "args": "--x"}).encode(), 400, "args must be"),
        ("POST", "/v1/jobs", json.dumps({**good, "args": [1]}).encode(), 400, "args must be"),
        ("POST", "/v1/jobs", json.dumps({**good, "cwd": "relative"}).encode(), 400, "absolute"),
        ("POST", "/v1/jobs", json.dumps({**good, "cwd": "/no/such/dir"}).encode(), 400, "not a directory"),
        ("POST", "/v1/jobs", json.dumps({**good, "restarts": True}).encode(), 400, "restarts"),
        ("POST", "/v1/jobs", json.dumps({**good, "name": "x" * 201}).encode(), 400, "name"),
        ("POST", "/v1/jobs", json.dumps({**good, "args": ["--model.lr=abc"]}).encode(), 400, "model"),
        ("POST", "/v1/jobs", b" " * (2 << 20), 413, "limit"),
        ("POST", "/v1/calls", b"x", 400, "cwd"),
        ("POST", "/v1/calls?cwd=/&command=exec", b"x", 400, "command"),
        ("GET", "/v1/jobs?state=evil", None, 400, "state must be"),
        ("GET", "/v1/jobs?limit=0", None, 400, "limit"),
        ("GET", "/v1/jobs?limit=abc", None, 400, "limit"),
        ("GET", "/v1/jobs/999999", None, 404, "no job"),
        ("POST", "/v1/jobs/999999/cancel", b"{}", 404, "no job"),
        ("GET", "/v1/jobs/999999/events", None, 404, "no job"),
        ("GET", "/v1/jobs/999999/result", None, 404, "no job"),
        ("GET", "/v1/jobs/1/../../../etc/passwd", None, 404, ""),
    ]
    for method, path, body, expected, words in cases:
        status, answer = _raw(server, method, path, body, json_headers)
        assert status == expected, (path, body and body[:80], status, answer)
        assert words.lower() in json.dumps(answer).lower(), (path, answer)
    status, answer = _raw(server, "GET", "/v1/jobs/1/events", None, _auth(server, **{"Last-Event-ID": "abc"}))
    assert status in (400, 404), answer
    assert _raw(server, "GET", "/v1/server", headers=_auth(server))[1]["state"] == "ready"
    assert "Traceback" not in server.output()


def test_openapi_describes_the_api(server: RunningServer) -> None:
    status, document = _raw(server, "GET", "/openapi.json", headers=_auth(server))
    assert status == 200 and document["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/calls", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/cancel"} <= set(document["paths"])


# --- jobs --------------------------------------------------------------------------------------
def test_a_fit_job_streams_its_events_keeps_them_and_replays_them(server: RunningServer, tmp_path: Path) -> None:
    client = server.client()
    checkpoints = tmp_path / "ckpt"
    job = _tiny(
        client,
        tmp_path,
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={checkpoints}",
        "--trainer.callbacks.save_last=true",
        "--trainer.max_epochs=2",
        name="<b>tiny</b>",
    )
    assert job["state"] in ("queued", "running") and job["name"] == "<b>tiny</b>"
    events = list(client.events(job["id"]))
    ids = [event_id for event_id, _, _ in events]
    kinds = [kind for _, kind, _ in events]
    assert ids == sorted(set(ids)), "event ids increase and never repeat"
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "finished"
    for kind in ("run_start", "epoch_start", "train_batch", "validation", "epoch_end", "checkpoint", "run_end"):
        assert kind in kinds, (kind, kinds)
    batches = [data for _, kind, data in events if kind == "train_batch"]
    assert len(batches) == 8 and batches[0]["total_steps"] == 8  # 64 samples / 8 per batch / 2 ranks x 2 epochs
    assert all("train_loss" in b["metrics"] and b["job_id"] == job["id"] for b in batches)
    saved = [data for _, kind, data in events if kind == "checkpoint"]
    assert str(checkpoints / "last.ckpt") in {data["checkpoint_path"] for data in saved}
    finished = events[-1][2]
    assert finished["state"] == "succeeded" and finished["exit_code"] == 0
    shown = client.job(job["id"])
    assert shown["state"] == "succeeded" and shown["finished_at"] >= shown["started_at"] >= shown["created_at"]
    assert shown["metrics"]["train_loss"] == pytest.approx(batches[-1]["metrics"]["train_loss"], rel=1e-6)
    assert Path(shown["artifacts"]["last_checkpoint"]).is_file()
    # A finished job's stream replays exactly; a reconnect after event k gets exactly the rest.
    assert list(client.events(job["id"])) == events
    k = ids[len(ids) // 2]
    assert list(client.events(job["id"], after=k)) == [e for e in events if e[0] > k]
    assert job["id"] in [j["id"] for j in client.jobs()]
    assert [j["id"] for j in client.jobs(state="succeeded", limit=1)] == [job["id"]]


def test_bad_input_is_refused_before_it_is_queued(server: RunningServer, tmp_path: Path) -> None:
    client = server.client()
    before = [j["id"] for j in client.jobs(limit=1000)]
    for args, words in (
        (["--model.lr=abc"], "model.lr"),
        (["--trainer.devices=3"], "--trainer.devices=2"),
        (["--trainer.strategy=ddp"], "lightdist"),
        (["--trainer.max_epochs=1", "--no_such_option=1"], "no_such_option"),
        (["--print_config"], "print_config"),
    ):
        with pytest.raises(BadInput) as refused:
            _tiny(client, tmp_path, *args)
        assert words in refused.value.message and "\n" not in refused.value.message, refused.value.message
    assert [j["id"] for j in client.jobs(limit=1000)] == before


def test_cancel_stops_a_running_job_and_the_ranks_stay_warm(server: RunningServer, tmp_path: Path) -> None:
    client = server.client()
    ranks = server.info()["rank_pids"]
    slow = _tiny(client, tmp_path, "--model.step_sleep=0.2", "--trainer.max_epochs=20")
    queued = _tiny(client, tmp_path)
    assert client.job(queued["id"])["position"] == 1
    cancelled_queued = client.cancel(queued["id"])
    assert cancelled_queued["state"] == "cancelled"
    for _, kind, _ in client.events(slow["id"]):
        if kind == "train_batch":
            break
    started = time.monotonic()
    client.cancel(slow["id"])
    job = wait_for_state(client, slow["id"], {"cancelled", "failed", "succeeded"}, timeout=30)
    assert job["state"] == "cancelled" and job["exit_code"] == 130, job
    assert time.monotonic() - started < 10
    with pytest.raises(Exception, match="already finished"):
        client.cancel(slow["id"])
    after = _tiny(client, tmp_path)
    assert wait_for_state(client, after["id"], {"succeeded", "failed"})["state"] == "succeeded"
    assert server.info()["rank_pids"] == ranks


def test_a_slow_step_is_never_cut_short_but_a_second_cancel_replaces_its_ranks(
    server: RunningServer, tmp_path: Path
) -> None:
    client = server.client()
    ranks = server.info()["rank_pids"]
    slow = _tiny(client, tmp_path, "--model.step_sleep=4", "--model.sleep_from_step=1")
    for _, kind, _ in client.events(slow["id"]):
        if kind == "train_batch":
            break
    client.cancel(slow["id"])  # lands inside the 4 s step: the ranks finish it, then stop together
    assert wait_for_state(client, slow["id"], {"cancelled", "failed", "succeeded"}, 30)["state"] == "cancelled"
    assert server.info()["rank_pids"] == ranks
    stuck = _tiny(client, tmp_path, "--model.step_sleep=30", "--model.sleep_from_step=1")
    for _, kind, _ in client.events(stuck["id"]):
        if kind == "train_batch":
            break
    client.cancel(stuck["id"])
    started = time.monotonic()
    client.cancel(stuck["id"])  # again: whoever is still inside a step after the grace period is replaced
    job = wait_for_state(client, stuck["id"], {"cancelled", "failed", "succeeded"}, 30)
    assert job["state"] == "cancelled" and job["exit_code"] == 130, job
    assert time.monotonic() - started < 15
    assert "grace period" in job["error"]["message"], job["error"]
    after = _tiny(client, tmp_path)
    assert wait_for_state(client, after["id"], {"succeeded", "failed"}, 90)["state"] == "succeeded"
    assert server.info()["rank_pids"] != ranks


_ATTACHED_CLIENT = """
import sys
from lightdist.server._client import Client, find_server
client = Client(find_server(state_dir=sys.argv[1]))
job = client.submit("fit", sys.argv[3:], cwd=sys.argv[2], attach=True)
print(job["id"], flush=True)
for _, kind, _ in client.events(job["id"], attach=True):
    if kind == "train_batch":
        print("stepping", flush=True)
"""


def test_a_killed_client_cancels_its_job_and_the_next_job_runs(server: RunningServer, tmp_path: Path) -> None:
    client = server.client()
    ranks = server.info()["rank_pids"]
    args = [*TINY, "--model.step_sleep=0.2", "--trainer.max_epochs=50"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _ATTACHED_CLIENT, str(server.state_dir), str(tmp_path), *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        job_id = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "stepping"
    finally:
        proc.kill()
        proc.wait(10)
    killed = time.monotonic()
    job = wait_for_state(client, job_id, {"cancelled", "failed", "succeeded"}, timeout=ATTACH_GRACE_S + 20)
    assert job["state"] == "cancelled", job
    assert time.monotonic() - killed < ATTACH_GRACE_S + 10
    after = _tiny(client, tmp_path)
    assert wait_for_state(client, after["id"], {"succeeded", "failed"})["state"] == "succeeded"
    assert server.info()["rank_pids"] == ranks


def test_a_rank_dying_fails_its_job_and_the_pool_recovers_for_the_next(server: RunningServer, tmp_path: Path) -> None:
    client = server.client()
    ranks = server.info()["rank_pids"]
    doomed = _tiny(client, tmp_path, "--model.die_at_step=1")
    job = wait_for_state(client, doomed["id"], {"failed", "succeeded", "cancelled"})
    assert job["state"] == "failed" and job["exit_code"] == 1, job
    assert "WorkerDied" in job["error"]["type"] or "died" in job["error"]["message"], job["error"]
    assert "rank 1" in job["error"]["message"]
    after = _tiny(client, tmp_path)
    assert wait_for_state(client, after["id"], {"succeeded", "failed"}, timeout=90)["state"] == "succeeded"
    now = server.info()["rank_pids"]
    assert now["0"] == ranks["0"] and now["1"] != ranks["1"], (ranks, now)


def test_two_clients_submitting_at_once_both_run_in_order(server: RunningServer, tmp_path: Path) -> None:
    submitted: list[dict[str, Any]] = []
    barrier = threading.Barrier(2)

    def submit() -> None:
        client = server.client()
        barrier.wait(10)
        submitted.append(_tiny(client, tmp_path))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    client = server.client()
    first, second = sorted(
        (wait_for_state(client, job["id"], {"succeeded", "failed"}) for job in submitted), key=lambda j: j["id"]
    )
    assert first["state"] == second["state"] == "succeeded"
    assert second["started_at"] >= first["finished_at"]


# --- lifecycle -------------------------------------------------------------------------------------
def test_a_killed_server_takes_its_ranks_and_a_restart_keeps_the_history(
    server_holder: SharedServer, tmp_path: Path
) -> None:
    running = server_holder.running
    state = running.state_dir
    client = running.client()
    ranks = [int(pid) for pid in running.info()["rank_pids"].values()]
    done = _tiny(client, tmp_path)
    wait_for_state(client, done["id"], {"succeeded"})
    checkpoints = tmp_path / "ckpt"
    resumable = _tiny(
        client,
        tmp_path,
        "--model.step_sleep=0.1",
        "--model.sleep_until_resumed=true",  # long enough to kill it; no waiting once it resumes
        "--trainer.max_epochs=30",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={checkpoints}",
        "--trainer.callbacks.save_last=true",
        restarts=1,
    )
    queued = _tiny(client, tmp_path)
    failure: list[BaseException] = []
    seen_epoch = threading.Event()

    def follow() -> None:
        try:
            for _, kind, _ in Client(running.server).events(resumable["id"]):
                if kind == "checkpoint":
                    seen_epoch.set()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            failure.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    assert seen_epoch.wait(60), "no checkpoint was written"
    url = running.server.url
    follow_cli = ["jobs", str(resumable["id"]), "--follow", "--server", f"{url}/?token={running.server.token}"]
    cli = ClientProcess(*follow_cli, state_dir=state, cwd=tmp_path)
    try:
        cli.wait_for(r"lightdist: fit on 2 rank", timeout=30)  # it follows: the job's events arrive
        running.proc.kill()
        killed = time.monotonic()
        follower.join(10)
        assert not follower.is_alive()
        assert failure and isinstance(failure[0], ServerGone), failure
        assert time.monotonic() - killed < 2.0 + 0.5, "a waiting client learns the server is gone within 2 s"
        status, out = cli.finish(timeout=10)
        assert status == 1 and time.monotonic() - killed < 2.0 + 0.5, out  # lightdist jobs ID --follow, too
    finally:
        cli.close()
    said = [line for line in out.splitlines() if line.startswith(f"lightdist jobs {resumable['id']}: ")]
    assert len(said) == 1 and out.rstrip().endswith(said[0]), out  # one line, the last
    assert said[0].startswith(f"lightdist jobs {resumable['id']}: error: ") and url in said[0], out
    assert wait_until(lambda: not any(pid_alive(pid) for pid in ranks), 5.0), "ranks outlived the server by 5 s"
    server_holder.stop()  # reaps it; asserts that nothing it started is left

    again = server_holder.running  # a new server on the same state dir, kept for the later tests
    client = again.client()
    assert client.job(done["id"])["state"] == "succeeded"
    resumed = wait_for_state(client, resumable["id"], {"succeeded", "failed"}, timeout=120)
    assert resumed["state"] == "succeeded" and resumed["attempt"] == 2, resumed
    assert resumed["args"][-1] == "--ckpt_path=last"
    kinds = [kind for _, kind, _ in client.events(resumable["id"])]
    assert "interrupted" in kinds and kinds.count("started") == 2
    assert wait_for_state(client, queued["id"], {"succeeded", "failed"})["state"] == "succeeded"


def test_background_serve_stops_on_request_and_refuses_a_second_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    command = [sys.executable, "-m", "lightdist.cli", "serve", "--port", "0", "--state-dir", str(state)]
    mark = uuid.uuid4().hex  # the background server leaves this process's tree: find it by its marker
    env = {**os.environ, MARK: mark}
    started = subprocess.run([*command, "--background"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    info = json.loads((state / "server.json").read_text())
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert info["url"] in started.stdout and "--stop" in started.stdout
        second = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert second.returncode == 1 and "already running" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        stopped = subprocess.run(
            [*command[:4], "--stop", "--state-dir", str(state)], capture_output=True, text=True, timeout=90
        )
    assert stopped.returncode == 0, stopped.stderr
    assert not (state / "server.json").exists()
    assert wait_until(lambda: not pid_alive(info["pid"]), 5.0)
    assert_nothing_left(mark, "lightdist serve --background")
    again = subprocess.run(
        [*command[:4], "--stop", "--state-dir", str(state)], capture_output=True, text=True, timeout=30
    )
    assert again.returncode == 1 and "no server is running" in again.stderr
