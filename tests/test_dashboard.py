"""The dashboard of ``lightdist serve`` in a real browser (headless Chromium driven by Playwright),
and the event streams under several clients (issue 14).

The server is the one shared with the other server modules (tests/conftest.py's ``SharedServer``:
a start costs ~10 s; the last test restarts it on the same state directory), and there is one
browser; each test opens its own browser context (its own cookies). The browser is Debian's
``chromium`` (``.ci/run`` installs it); Playwright only drives it and never downloads a browser.
Screenshots go to ``<pytest basetemp>/dashboard-screenshots`` (printed at the start).
"""

from __future__ import annotations

import http.client
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lightdist.bench.server_load import follow, ticker_args
from lightdist.server._client import Client
from tests.conftest import OWNED_ELSEWHERE, SharedServer, descendants
from tests.dashboard_models import HOSTILE
from tests.server_helpers import RunningServer, wait_for_state

pytestmark = pytest.mark.timeout(180)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def _steady(*more: str) -> list[str]:
    return [
        "--model",
        "tests.dashboard_models.Steady",
        "--data",
        "tests.server_models.TinyData",  # 64 samples, batches of 8 on 2 ranks: 4 steps an epoch
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false",
        *more,
    ]


@dataclass
class Dash:
    holder: SharedServer
    shots: Path
    contexts: list[Any] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    @property
    def running(self) -> RunningServer:
        return self.holder.running

    @property
    def url(self) -> str:
        return self.running.server.url

    def client(self) -> Client:
        return self.running.client()

    def restart(self) -> None:
        assert self.holder.restart() == 0, "SIGTERM stops the server cleanly"


@pytest.fixture(scope="module")
def dash(server_holder: SharedServer, tmp_path_factory: pytest.TempPathFactory) -> Dash:
    """The shared server (tests/conftest.py), seen through the browser."""
    shots = tmp_path_factory.getbasetemp() / "dashboard-screenshots"
    shots.mkdir(exist_ok=True)
    print(f"\ndashboard screenshots: {shots}")
    return Dash(server_holder, shots)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    before = descendants()
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
    except BaseException:
        playwright.stop()
        raise
    roots = descendants() - before  # Playwright's driver and the browser; renderers start under them

    def owned() -> set[int]:
        return {pid for root in roots for pid in (root, *descendants(root))}

    OWNED_ELSEWHERE.append(owned)
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()
        OWNED_ELSEWHERE.remove(owned)


def _page(dash: Dash, browser: Any, viewport: dict[str, int] = DESKTOP) -> Any:
    """A fresh browser context (no cookies) logged in with the server's one-time link."""
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(30_000)
    dash.contexts.append(context)
    page = context.new_page()
    page.on("pageerror", lambda error: dash.page_errors.append(str(error)))
    page.goto(f"{dash.url}/?token={dash.running.server.token}")
    assert page.url == f"{dash.url}/", "the login link redirects to an address without the token"
    return page


@pytest.fixture(autouse=True)
def _close_contexts(dash: Dash) -> Iterator[None]:
    yield
    for context in dash.contexts:
        context.close()
    dash.contexts.clear()
    errors, dash.page_errors[:] = list(dash.page_errors), []
    assert not errors, f"uncaught errors in the pages: {errors}"


def _points(page: Any, metric: str) -> int:
    return int(page.evaluate("m => document.querySelector(`.chart[data-metric='${m}']`)?.dataset.points ?? 0", metric))


def _wait_points(page: Any, metric: str, at_least: int, timeout: float = 60_000) -> None:
    page.wait_for_function(
        "([m, n]) => Number(document.querySelector(`.chart[data-metric='${m}']`)?.dataset.points ?? 0) >= n",
        arg=[metric, at_least],
        timeout=timeout,
    )


def _assert_inert(page: Any) -> None:
    """Markup in a job's strings stayed text: no element was made of it, no handler ran."""
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img").count() == 0


def _fits_width(page: Any) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


def _post(url: str, path: str, headers: dict[str, str]) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json", **headers})
        return conn.getresponse().status
    finally:
        conn.close()


# --- security ----------------------------------------------------------------------------------------
def test_the_login_link_sets_an_httponly_cookie_and_browser_writes_need_this_origin(dash: Dash, browser: Any) -> None:
    context = browser.new_context()
    dash.contexts.append(context)
    stranger = context.new_page()
    response = stranger.goto(f"{dash.url}/")
    assert response.status == 401 and "token" in stranger.text_content("body")

    page = _page(dash, browser)
    cookie = next(c for c in page.context.cookies() if c["name"].startswith("lightdist-"))
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert dash.running.server.token not in cookie["value"], "the cookie is derived from the token, not the token"
    assert page.evaluate("document.cookie") == ""
    cancel = "h => fetch('/v1/jobs/999999/cancel', {method: 'POST', headers: h}).then(r => r.status)"
    assert page.evaluate(cancel, {}) == 403, "a cookie-authenticated write without the CSRF header"
    assert page.evaluate(cancel, {"X-Lightdist-CSRF": "1"}) == 404, "the dashboard's own writes pass the gate"
    jar = {"Cookie": f"{cookie['name']}={cookie['value']}", "X-Lightdist-CSRF": "1"}
    port = urllib.parse.urlsplit(dash.url).port
    for forged in (
        {"Origin": "http://evil.example"},
        {"Origin": f"http://127.0.0.1:{port + 1}"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        assert _post(dash.url, "/v1/jobs/999999/cancel", {**jar, **forged}) == 403, forged
    assert _post(dash.url, "/v1/jobs/999999/cancel", {"Authorization": f"Bearer {cookie['value']}"}) == 401
    assert _post(dash.url, "/v1/jobs/999999/cancel", {"Authorization": f"Bearer {dash.running.server.token}"}) == 404


# --- jobs ------------------------------------------------------------------------------------------------
def test_a_job_submitted_through_the_form_runs_and_a_bad_override_shows_next_to_the_form(
    dash: Dash, browser: Any, tmp_path: Path
) -> None:
    client = dash.client()
    page = _page(dash, browser)
    page.wait_for_selector("#config option[value='digits/pretrain-cpu']", state="attached")
    assert page.input_value("#cwd") == str(dash.running.state_dir.resolve() / "runs")
    before = len(client.jobs(limit=1000))
    page.fill("#overrides", "--model.lr=abc")
    page.click("#submit")
    assert "model.lr" in page.wait_for_selector("#submit-error:not([hidden])").text_content()
    assert len(client.jobs(limit=1000)) == before, "nothing is queued when the server refuses the config"

    page.select_option("#config", "digits/pretrain-cpu")
    page.fill("#name", HOSTILE)
    page.fill("#overrides", "--trainer.max_epochs=2\n--trainer.limit_train_batches 3\n--trainer.limit_val_batches=2")
    page.fill("#cwd", str(tmp_path))
    page.click("#submit")
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    page.wait_for_selector("body[data-state=succeeded]", timeout=120_000)
    _wait_points(page, "loss", 6 + 2)  # 2 epochs x 3 train steps, and 2 validations
    assert HOSTILE in page.text_content("#job-title")
    assert page.is_visible("a[href$='/artifacts/last_checkpoint']")
    assert "lightdist tensorboard --logdir" in page.text_content("#tensorboard-command")
    _assert_inert(page)
    page.screenshot(path=str(dash.shots / "job-succeeded-1280.png"), full_page=True)

    page.goto(f"{dash.url}/")
    job_id = client.jobs(limit=1)[0]["id"]
    row = page.wait_for_selector(f"tr[data-job-id='{job_id}']")
    assert row.query_selector("td.name").text_content() == HOSTILE
    assert "val_acc" in row.query_selector("td.metric").text_content()
    _assert_inert(page)
    page.screenshot(path=str(dash.shots / "jobs-1280.png"), full_page=True)
    page.set_viewport_size(PHONE)
    assert _fits_width(page), "the jobs page scrolls sideways on a phone"
    page.screenshot(path=str(dash.shots / "jobs-390.png"), full_page=True)


def test_the_chart_gains_points_while_the_job_runs_and_the_cancel_button_stops_it(
    dash: Dash, browser: Any, tmp_path: Path
) -> None:
    client = dash.client()
    args = _steady("--model.step_sleep=0.25", "--trainer.max_epochs=40", "--model.hostile_metric=true")
    job = client.submit("fit", args, cwd=str(tmp_path), name="live")
    page = _page(dash, browser)
    page.goto(f"{dash.url}/jobs/{job['id']}")
    _wait_points(page, "loss", 3)
    seen = _points(page, "loss")
    _wait_points(page, "loss", seen + 2, timeout=20_000)
    assert page.get_attribute("body", "data-state") == "running", "the points came in while the job ran"
    metrics = page.eval_on_selector_all(".chart", "nodes => nodes.map(n => n.dataset.metric)")
    assert HOSTILE in metrics, metrics
    _assert_inert(page)
    page.screenshot(path=str(dash.shots / "job-running-1280.png"))
    page.click("#cancel")
    page.wait_for_selector("body[data-state=cancelled]", timeout=30_000)
    finished = wait_for_state(client, job["id"], {"cancelled", "failed", "succeeded"}, timeout=10)
    assert finished["state"] == "cancelled" and finished["exit_code"] == 130, finished
    assert page.is_hidden("#cancel")


def test_a_failed_job_shows_its_error_and_traceback_as_text_on_a_phone(
    dash: Dash, browser: Any, tmp_path: Path
) -> None:
    client = dash.client()
    job = client.submit("fit", _steady("--model.fail_at_step=2"), cwd=str(tmp_path))
    page = _page(dash, browser, PHONE)
    page.goto(f"{dash.url}/jobs/{job['id']}")
    page.wait_for_selector("body[data-state=failed]", timeout=60_000)
    page.wait_for_selector("#error-panel:not([hidden])")
    assert HOSTILE in page.text_content("#error-message")
    traceback = page.text_content("#traceback")
    assert "Traceback" in traceback and "RuntimeError" in traceback and HOSTILE in traceback
    _assert_inert(page)
    assert _fits_width(page), "the job page scrolls sideways on a phone"
    page.screenshot(path=str(dash.shots / "job-failed-390.png"), full_page=True)


def test_ten_event_stream_clients_each_get_every_event_exactly_once(dash: Dash, tmp_path: Path) -> None:
    client = dash.client()
    job = client.submit("fit", ticker_args(60, 0.02), cwd=str(tmp_path))
    followers = follow(dash.running.server, job["id"], clients=10, timeout=120)
    reference = [event_id for event_id, _, _ in client.events(job["id"])]
    assert len(reference) > 60
    for follower in followers:
        assert follower.error is None, follower.error
        assert follower.ids == reference


# --- restart (last: it replaces the shared server) ------------------------------------------------------
def test_a_finished_job_shows_whole_after_a_server_restart(dash: Dash, browser: Any, tmp_path: Path) -> None:
    client = dash.client()
    job = client.submit("fit", _steady("--trainer.max_epochs=3"), cwd=str(tmp_path), name="before the restart")
    assert wait_for_state(client, job["id"], {"succeeded", "failed"})["state"] == "succeeded"
    events = list(client.events(job["id"]))
    loss_points = sum(kind == "train_batch" for _, kind, _ in events) + sum(
        kind == "validation" for _, kind, _ in events
    )
    dash.restart()
    page = _page(dash, browser)
    page.goto(f"{dash.url}/jobs/{job['id']}")
    page.wait_for_selector("body[data-state=succeeded]")
    _wait_points(page, "loss", loss_points)
    page.wait_for_function("n => Number(document.querySelector('#event-log').dataset.events) === n", arg=len(events))
    assert _points(page, "loss") == loss_points, "a replay draws each point once"
    assert page.is_visible("#final-metrics")
    page.screenshot(path=str(dash.shots / "job-after-restart-1280.png"), full_page=True)
