"""One night's work in a real browser, as ops and as a manager, against ``restore up``.

``restore up`` runs as the operator starts it, on loopback, with a small estate and a rehearsal ledger
in a temporary directory. In Chromium the ops engineer runs ``restore-wave`` for ``icu`` from the
Prefect UI (Run → Custom run, parameters typed into the form), finds the approval from the link in the
run's log, and approves in the Resume dialog; a manager, in a browser context of their own, follows
the run's artifact to the live dashboard and watches the wave go from 0 % to 100 % without reloading;
then the situation report is written and opened.

Every request of both contexts is recorded and counted per origin; one that would leave loopback is
refused before it goes out, and fails the test. The seconds from each host coming online in the
ledger to the dashboard showing it are measured. Screenshots of each step land in
``test-artifacts/screenshots/`` (README: "The browser test").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Frame, Locator, Page, Response, expect, sync_playwright
from sqlalchemy.engine import make_url

from restore_flows.flows.server import stop_process_group
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.repository import Ledger
from tests.browser.browsing import ROOT, RequestLog, Screenshots, chromium_path

pytestmark = pytest.mark.slow

ESTATE = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital, description: Arlon general hospital}
  - {name: bas, kind: hospital, description: Bastogne hospital}
pools:
  - {name: imaging-arl, capacity: 2}
  - {name: imaging-bas, capacity: 2}
roles:
  - {name: dc, kind: server, services: [identity], department: it}
  - {name: icu-gw, kind: server, services: [icu], department: icu}
  - name: icu-ws
    kind: workstation
    department: icu
    services: [icu]
    depends_on: ["icu-gw-{site}"]
    pools: {reimage: ["imaging-{site}"]}
  - name: lab-ws
    kind: workstation
    department: lab
    services: [lab]
    pools: {reimage: ["imaging-{site}"]}
hosts:
  - {name: dc-arl-01, role: dc, site: arl, forensic_hold: true}
  - {name: icu-gw-arl, role: icu-gw, site: arl}
  - {name: icu-gw-bas, role: icu-gw, site: bas}
groups:
  - defaults: {role: icu-ws, site: arl}
    hosts:
      - name: ws-icu-arl-[01:06]
  - defaults: {role: icu-ws, site: bas}
    hosts:
      - name: ws-icu-bas-[01:04]
  - defaults: {role: lab-ws, site: arl}
    hosts:
      - name: ws-lab-arl-[01:04]
"""
ICU_HOSTS = 12
TIME_SCALE = 0.002
"""A server's 72 planned minutes take about 9 s: the wave comes back in some 15 s."""
DURATION_NOISE = 0.5
"""Each stage takes its time x (1 +- this): the hosts come back one by one, not in two batches."""
APPROVER = "Dr. Ada Osei"
VIEWPORT = {"width": 1400, "height": 900}
SHOWN_WITHIN = 5.0
"""Seconds within which the dashboard must show a host that came online (issue: 'within 5 s')."""


@dataclass
class Up:
    """``restore up`` running for one test."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    home: Path
    ui: str
    dashboard: str
    log: Path

    def ledger(self) -> Ledger:
        return Ledger(make_engine(f"sqlite:///{self.home / 'data' / 'rehearsal.sqlite3'}"))

    def restore(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).with_name("restore")), *args],
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def chromium() -> str:
    return chromium_path()


@pytest.fixture
def restore_up(chromium: str, ledger_url_postgresql: str, tmp_path: Path) -> Iterator[Up]:
    """``restore up`` with Prefect's own database in PostgreSQL, as for operations: on SQLite, with
    the machine under load, the server answered 503 ("database is locked") to a Run and a Resume."""
    (tmp_path / "inventory").mkdir()
    (tmp_path / "inventory" / "estate.yaml").write_text(textwrap.dedent(ESTATE))
    prefect_port, dashboard_port = _free_port(), _free_port()
    # Nothing of this process's Prefect or restore settings (other tests set some) may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RESTORE_"))}
    env.pop("PYTHONWARNINGS", None)
    env.update(
        RESTORE_DATA_DIR=str(tmp_path / "data"),
        RESTORE_INVENTORY=str(tmp_path / "inventory"),
        RESTORE_PREFECT_HOST="127.0.0.1",
        RESTORE_PREFECT_PORT=str(prefect_port),
        RESTORE_DASHBOARD_PORT=str(dashboard_port),
        RESTORE_PREFECT_DATABASE_URL=make_url(ledger_url_postgresql)
        .set(drivername="postgresql+asyncpg")
        .render_as_string(hide_password=False),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "restore-up.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("restore")), "up"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    up = Up(
        process,
        env,
        tmp_path,
        f"http://127.0.0.1:{prefect_port}/",
        f"http://127.0.0.1:{dashboard_port}/",
        log,
    )
    try:
        _wait_ready(up, timeout=240)
        yield up
    finally:
        # As a service manager stops it: SIGTERM, and 'restore up' stops the Prefect server it started.
        stop_process_group(process, signal.SIGTERM, timeout=90)
        record = tmp_path / "data" / "prefect" / "server.json"
        if record.exists():  # it did not get as far as stopping its server: stop it here
            pid = int(json.loads(record.read_text()).get("pid", 0))
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def _wait_ready(up: Up, timeout: float) -> None:
    """Until the UI has the restore-wave deployment and the dashboard answers."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5, trust_env=False) as http:
        while True:
            if up.process.poll() is not None:
                raise AssertionError(f"restore up exited ({up.process.returncode}):\n{up.log.read_text()}")
            try:
                found = http.get(f"{up.ui}api/deployments/name/restore-wave/restore-wave")
                page = http.get(up.dashboard)
                if found.status_code == 200 and page.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"restore up not ready after {timeout:.0f} s:\n{up.log.read_text()}")
            time.sleep(0.5)


def _field(scope: Page | Locator, label: str) -> Locator:
    """One field of a Prefect schema form, by the label it shows."""
    return scope.locator(
        "xpath=.//div[contains(concat(' ', @class, ' '), ' schema-form-property ')]"
        "[./div[contains(@class, 'p-label__header')]"
        f"//span[contains(@class, 'schema-form-property__label') and normalize-space()='{label}']]"
    )


def _wave(page: Page, name: str) -> Locator:
    return page.locator("article.wave").filter(
        has=page.locator(".wave-name", has_text=re.compile(f"^{re.escape(name)}$"))
    )


def _online(counts_text: str) -> tuple[int, int]:
    found = re.match(r"(\d+) of (\d+) online", counts_text)
    assert found, counts_text
    return int(found[1]), int(found[2])


@pytest.mark.timeout(600)  # about 3 minutes here, 'restore up' starting and stopping included
def test_ops_approve_in_the_ui_and_a_manager_watches_it_live(restore_up: Up, chromium: str) -> None:
    up = restore_up
    requests = RequestLog()
    shots = Screenshots("ops-session")
    began = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            figures = _session(up, browser, requests, shots)
        finally:
            browser.close()
    report = "\n".join(
        [
            f"browser session: {time.monotonic() - began:.0f} s",
            figures,
            "requests per origin (both browser contexts, the whole session):",
            requests.table(),
            "screenshots:",
            *(f"  {p.relative_to(ROOT)}" for p in shots.taken),
        ]
    )
    (shots.folder.parent / "ops-session.txt").write_text(report + "\n")
    print(report)
    assert requests.outside == [], f"requests that would have left loopback: {requests.outside}"
    assert requests.counts[up.ui.rstrip("/")] > 0
    assert requests.counts[up.dashboard.rstrip("/")] > 0


def _session(up: Up, browser: Browser, requests: RequestLog, shots: Screenshots) -> str:
    """The session, with a screenshot of every open page and the HTTP errors seen if it fails."""
    ops_context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    manager_context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    errors: list[str] = []

    def answered(response: Response) -> None:
        if response.status >= 400:
            errors.append(f"{response.status} {response.request.method} {response.url}")

    for context in (ops_context, manager_context):
        requests.watch(context)
        context.on("response", answered)
    try:
        figures = _as_ops_and_manager(up, ops_context.new_page(), manager_context.new_page(), shots)
    except BaseException:
        for who, context in (("ops", ops_context), ("manager", manager_context)):
            for page in context.pages:
                shots.take(page, f"FAILED-{who}")
        print("HTTP errors the pages saw:", *errors, sep="\n  ")
        raise
    # A server error the UI swallowed (a toast, a retry) is still one: the session must have none.
    assert not [e for e in errors if e.startswith("5")], errors
    return "\n".join([figures, "HTTP errors the pages saw (4xx are Prefect UI's own):", *errors])


def _as_ops_and_manager(up: Up, ops: Page, manager: Page, shots: Screenshots) -> str:
    # Ops: the front page, then Deployments → restore-wave → Run → Custom run.
    ops.goto(up.ui)
    ops.get_by_role("button", name="Deployments", exact=True).click()
    expect(ops.get_by_role("link", name="restore-wave").first).to_be_visible()
    shots.take(ops, "deployments")
    ops.get_by_role("link", name="restore-wave").first.click()
    ops.get_by_role("button", name="Run", exact=True).click()
    ops.get_by_text("Custom run").click()
    expect(_field(ops, "Mode (Optional)").locator(".p-select-button__value")).to_have_text("rehearsal")
    _field(ops, "Ask Approval (Optional)").get_by_role("switch").click()
    _field(ops, "Time Scale (Optional)").locator("input").fill(str(TIME_SCALE))
    _field(ops, "Duration Noise (Optional)").locator("input").fill(str(DURATION_NOISE))
    wave = _field(ops, "Wave")
    # The dropdown opens from the keyboard; a click on it opens and closes it again.
    wave.locator("button.p-select-button__control").focus()
    ops.keyboard.press("ArrowDown")
    ops.get_by_role("option", name="icu", exact=True).click()
    expect(wave.locator(".p-select-button__value")).to_have_text("icu")
    wave.scroll_into_view_if_needed()
    shots.take(ops, "custom-run-form")
    ops.get_by_role("button", name="Submit").click()
    # The UI goes back to the deployment and says "<run> scheduled to start now [View run]"; it has two
    # toast areas, one above the other: the button to press is in the top one.
    view_run = ops.get_by_role("button", name="View run").last
    expect(view_run).to_be_visible()
    shots.take(ops, "run-scheduled")
    view_run.click()
    ops.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    run_id = re.findall(r"[0-9a-f-]{36}", ops.url)[-1]

    # The run pauses before the first wipe; its log says so, with a link to where Resume is.
    needed = ops.locator(".p-link", has_text=f"flow-run/{run_id}")
    expect(ops.get_by_text("approval needed for wave(s) icu")).to_be_visible(timeout=120_000)
    expect(needed).to_be_visible()
    shots.take(ops, "run-log-approval-needed")

    # The manager follows the run's artifact to the live view (a new tab); the wave is at 0 %.
    manager.goto(f"{up.ui}runs/flow-run/{run_id}")
    manager.get_by_text("Artifacts", exact=True).click()
    card = manager.get_by_role("link").filter(has_text="manager-view")
    expect(card).to_be_visible()
    shots.take(manager, "run-artifacts")
    card.click()
    live_link = manager.get_by_role("link", name="The managers' live view")
    expect(live_link).to_be_visible()
    shots.take(manager, "artifact-manager-view")
    with manager.context.expect_page() as opened:
        live_link.click()
    dashboard = opened.value
    dashboard.wait_for_load_state()
    assert dashboard.url.startswith(up.dashboard), dashboard.url
    icu = _wave(dashboard, "icu")
    expect(icu.locator(".wave-counts")).to_contain_text(f"0 of {ICU_HOSTS} online")
    expect(icu.locator(".wave-percent")).to_have_text("0 %")
    dashboard.evaluate("window.restoreTestMarker = 'loaded once'")
    navigations: list[str] = []

    def navigated(frame: Frame) -> None:
        if frame == dashboard.main_frame:
            navigations.append(frame.url)

    dashboard.on("framenavigated", navigated)
    shots.take(dashboard, "dashboard-0-percent", full_page=True)

    # Ops approves from the log's link: the run page, Resume, name and wave typed.
    needed.click()
    ops.wait_for_url(re.compile(f"/runs/flow-run/{run_id}"))
    ops.get_by_role("button", name="Resume").click()
    dialog = ops.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Wave icu: {ICU_HOSTS} host(s) will be wiped and rebuilt")
    expect(dialog.get_by_role("listitem")).to_have_text(
        ["arl: 1 server(s)", "arl: 6 workstation(s)", "bas: 1 server(s)", "bas: 4 workstation(s)"]
    )
    _field(dialog, "Approver").locator("textarea").fill(APPROVER)
    _field(dialog, "Confirm Wave").locator("textarea").fill("icu")
    shots.take(ops, "resume-dialog")
    dialog.get_by_role("button", name="Submit").click()
    expect(dialog).to_be_hidden()
    approved_at = time.time()

    # The manager watches, without reloading: from 0 % to 100 %, host by host.
    seen: list[tuple[float, int]] = []
    midway_shot = False
    deadline = time.monotonic() + 240
    while True:
        online, total = _online(icu.locator(".wave-counts").inner_text())
        assert total == ICU_HOSTS
        if not seen or seen[-1][1] != online:
            seen.append((time.time(), online))
        if online == ICU_HOSTS:
            break
        if not midway_shot and 0 < online < ICU_HOSTS:
            midway_shot = True
            shots.take(dashboard, "dashboard-midway", full_page=True)
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard did not reach 100 % within 240 s; seen: {seen}")
        dashboard.wait_for_timeout(100)  # the poll's interval; the deadline above bounds the wait
    expect(icu.locator(".wave-percent")).to_have_text("100 %")
    assert dashboard.evaluate("window.restoreTestMarker") == "loaded once"
    assert navigations == [], f"the dashboard page navigated: {navigations}"
    assert len(seen) > 2, f"no step between 0 % and 100 % was shown: {seen}"
    shots.take(dashboard, "dashboard-100-percent", full_page=True)

    # What the ledger says, against what the page showed and when.
    ledger = up.ledger()
    _, online_at = ledger.back_online()
    icu_online = sorted(t.timestamp() for name, t in online_at.items() if name.startswith(("icu-", "ws-icu")))
    assert len(icu_online) == ICU_HOSTS
    approval = ledger.history("ws-icu-arl-01").approvals[0]
    assert (approval.approver, approval.automatic) == (APPROVER, False)
    # The k-th host to come online is on the page once the page counts k hosts online.
    lags = [min(when for when, count in seen if count >= k) - at for k, at in enumerate(icu_online, 1)]
    figures = (
        f"approval to wave back (as the dashboard showed it): {seen[-1][0] - approved_at:.1f} s; "
        f"steps the dashboard showed: {[count for _, count in seen]}\n"
        f"seconds from a host online in the ledger to the dashboard showing it ({len(lags)} hosts): "
        f"median {statistics.median(lags):.1f}, max {max(lags):.1f}, min {min(lags):.1f}"
    )
    assert min(lags) > -1.0, f"the page showed a host before the ledger had it online: {figures}"
    assert max(lags) <= SHOWN_WITHIN, figures

    # The run ends Completed, in our words (the run's Details tab).
    expect(ops.get_by_text("Completed", exact=True).first).to_be_visible(timeout=90_000)
    ops.get_by_text("Details", exact=True).click()
    ended = ops.get_by_text(f"wave icu: all {ICU_HOSTS} host(s) online")
    expect(ended).to_be_visible()
    ended.scroll_into_view_if_needed()
    shots.take(ops, "run-completed")

    # The situation report for the crisis cell, opened in the browser.
    report = up.home / "report.html"
    written = up.restore("report", "--rehearsal", "--html", str(report))
    assert written.returncode == 0, written.stdout + written.stderr
    manager.goto(report.as_uri())
    expect(manager.locator("body")).to_contain_text(APPROVER)
    shots.take(manager, "report", full_page=True)
    return figures
