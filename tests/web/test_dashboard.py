"""The live dashboard on loopback: the page and its data, read with httpx as a browser would."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from restore_flows.errors import UsageError
from restore_flows.ledger.status import bucket
from restore_flows.reporting.timeline import SVG_NAMESPACE
from restore_flows.settings import Settings
from restore_flows.states import HostState
from restore_flows.web.dashboard import POLICY, Dashboard, StatusSource, serve_dashboard
from tests.execution.conftest import run_threads
from tests.reporting.scenarios import HOSTILE_ERROR, HOSTILE_REASON, PausedFleet, Scenario, troubled


@pytest.fixture
def dashboard(settings: Settings) -> Iterator[Dashboard]:
    with serve_dashboard(settings, "127.0.0.1", 0, rehearsal=True) as running:
        yield running


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value or "" for name, value in attrs if name in ("src", "href", "action")]


def _status(client: httpx.Client, dashboard: Dashboard, query: str = "") -> dict[str, Any]:
    response = client.get(f"{dashboard.url}api/status.json{query}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_the_page_and_everything_it_loads_come_from_this_server(
    dashboard: Dashboard, client: httpx.Client
) -> None:
    page = client.get(dashboard.url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == POLICY
    assert "default-src 'none'" in POLICY
    links = _Links()
    links.feed(page.text)
    assert sorted(links.links) == ["dashboard.css", "dashboard.js"]
    bodies = {"/": page.text}
    for link in links.links:
        asset = client.get(dashboard.url + link)
        assert asset.status_code == 200, link
        assert asset.headers["content-security-policy"] == POLICY
        bodies[link] = asset.text
    svg = client.get(f"{dashboard.url}timeline.svg")
    assert svg.headers["content-type"] == "image/svg+xml"
    bodies["timeline.svg"] = svg.text.replace(f'xmlns="{SVG_NAMESPACE}"', "")
    for name, text in bodies.items():
        # No absolute URL and no protocol-relative one ('//host/...'): nothing but this server.
        assert "http://" not in text, name
        assert "https://" not in text, name
        assert "//" not in text, name
    script = bodies["dashboard.js"]
    # Ledger values only ever become text: no API that parses a string as HTML.
    assert re.findall(r"\.(?:inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", script) == []
    assert re.findall(r"fetch\(\"([^\"]+)\"", script) == ["api/status.json"]


def test_the_numbers_are_the_ledgers(dashboard: Dashboard, client: httpx.Client, scenario: Scenario) -> None:
    troubled(scenario)
    data = _status(client, dashboard)
    assert data["ledger"] == "rehearsal"
    states = scenario.ledger.states()
    assert data["estate"]["total"] == len(states)
    assert data["estate"]["online"] == sum(1 for s in states.values() if s is HostState.ONLINE)
    assert data["estate"]["failed"] == sum(1 for s in states.values() if bucket(s) == "failed")
    blocked = {"ws-brg-01", "ws-brg-02", "ws-brg-03"}
    for wave in data["waves"]:
        members = scenario.plan.wave(wave["name"]).hosts
        assert wave["total"] == len(members)
        assert wave["online"] == sum(1 for n in members if states[n] is HostState.ONLINE)
        assert wave["blocked"] == len(blocked & set(members))
        for site, counts in wave["sites"].items():
            at_site = [n for n in members if scenario.plan.estate.hosts[n].site == site]
            assert counts["total"] == len(at_site)
            assert counts["online"] == sum(1 for n in at_site if states[n] is HostState.ONLINE)
    icu = next(w for w in data["waves"] if w["name"] == "icu")
    assert (icu["percent"], icu["eta_minutes"], icu["will_not_finish"]) == (50.0, None, 4)
    core = next(w for w in data["waves"] if w["name"] == "core")
    assert core["finished_at"] is not None
    people = {b["host"]: b for b in data["needs_people"]}
    assert set(people) == {"gw-brg", "pc-brg-02"}
    assert HOSTILE_ERROR in people["gw-brg"]["reason"]  # JSON carries the text; the page sets textContent
    assert people["gw-brg"]["holds_back_hosts"] == sorted(blocked)
    assert people["pc-brg-02"]["reason"] == HOSTILE_REASON


def test_the_data_follows_the_ledger_without_reloading_the_page(
    dashboard: Dashboard, client: httpx.Client, scenario: Scenario
) -> None:
    """While a run is held in the Arlon gateway's verification the page shows it; once let go, the
    same JSON endpoint shows the wave back within 5 s (the page polls it every 2 s)."""
    page = client.get(dashboard.url).text
    before = _status(client, dashboard)
    assert before["estate"]["online"] == 0
    fleet = PausedFleet()
    thread = threading.Thread(target=run_threads, args=(scenario.ledger, scenario.plan, fleet))
    thread.start()
    try:
        assert fleet.inside.wait(30)
        during = _poll(client, dashboard, lambda d: _waits_for(d, "gw-arl") == 3, "gw-arl's workstations")
        icu = next(w for w in during["waves"] if w["name"] == "icu")
        assert icu["online"] < icu["total"]
    finally:
        fleet.go.set()
        thread.join(60)
    done_at = time.monotonic()
    assert set(scenario.ledger.states().values()) == {HostState.ONLINE}
    after = _poll(client, dashboard, lambda d: d["done"], "every host online")
    assert time.monotonic() - done_at < 5.0
    assert after["estate"]["online"] == after["estate"]["total"] == len(scenario.plan.estate.hosts)
    assert after["at"] != before["at"]
    assert client.get(dashboard.url).text == page  # the page is the same; only its data changed


def _waits_for(data: dict[str, Any], host: str) -> int:
    return next((int(b["holds_back"]) for b in data["waiting_for"] if b["host"] == host), 0)


def _poll(client: httpx.Client, dashboard: Dashboard, ready: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        data = _status(client, dashboard)
        if ready(data):
            return data
        assert time.monotonic() < deadline, f"the dashboard never showed {what}: {data}"
        time.sleep(0.05)


def test_the_ledger_is_chosen_by_a_query_parameter(dashboard: Dashboard, client: httpx.Client) -> None:
    assert _status(client, dashboard, "?ledger=rehearsal")["ledger"] == "rehearsal"
    live = client.get(f"{dashboard.url}api/status.json?ledger=live")
    assert live.status_code == 503
    assert live.json()["ledger"] == "live"
    assert "is not set up: run 'restore db upgrade'" in live.json()["error"]
    assert client.get(f"{dashboard.url}api/status.json?ledger=other").status_code == 400
    assert client.get(f"{dashboard.url}timeline.svg?ledger=live").status_code == 503


def test_a_request_for_another_host_name_is_refused(dashboard: Dashboard, client: httpx.Client) -> None:
    """A page elsewhere that rebinds its own name to 127.0.0.1 must not read the dashboard."""
    refused = client.get(f"{dashboard.url}api/status.json", headers={"Host": "evil.example"})
    assert refused.status_code == 403
    port = dashboard.url.rsplit(":", 1)[1].strip("/")
    assert (
        client.get(f"{dashboard.url}api/status.json", headers={"Host": f"localhost:{port}"}).status_code
        == 200
    )
    assert client.get(f"{dashboard.url}nothing-here").status_code == 404
    assert client.post(f"{dashboard.url}api/status.json").status_code == 501  # read-only


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.10", "example.org", "::"])
def test_only_loopback_is_served(settings: Settings, address: str) -> None:
    with pytest.raises(UsageError, match="loopback only"):
        serve_dashboard(settings, address, 0)


def test_a_port_in_use_is_a_clear_error(settings: Settings, dashboard: Dashboard) -> None:
    port = int(dashboard.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(UsageError, match="cannot listen"):
        serve_dashboard(settings, "127.0.0.1", port)


def test_one_reading_serves_every_request_for_a_couple_of_seconds(settings: Settings) -> None:
    now = [100.0]
    source = StatusSource(settings, cache_seconds=2.0, monotonic=lambda: now[0])
    first = source.reading(rehearsal=True)
    now[0] += 1.9
    assert source.reading(rehearsal=True) is first
    now[0] += 0.2
    again = source.reading(rehearsal=True)
    assert again is not first
    assert again.status == first.status == 200


def test_the_inventory_is_read_again_when_it_changes(
    dashboard: Dashboard, client: httpx.Client, scenario: Scenario
) -> None:
    assert _status(client, dashboard)["estate"]["total"] == 11
    estate = scenario.inventory / "estate.yaml"
    estate.write_text(estate.read_text().replace("pc-brg-[01:02]", "pc-brg-[01:04]"))
    # The two new PCs are not in the ledger yet (the dashboard never syncs): they count as waiting.
    data = _poll(client, dashboard, lambda d: d["estate"]["total"] == 13, "the bigger inventory")
    assert data["estate"]["waiting"] >= 2


def test_a_browser_draws_the_data_as_text(dashboard: Dashboard, scenario: Scenario) -> None:
    """In a real (headless) browser the script runs, draws every wave, and hostile values stay text."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium): the page's script is not run")
    troubled(scenario)
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            dashboard.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    dom = result.stdout
    assert "REHEARSAL ledger" in dom
    for wave in ("core", "icu", "rest"):
        assert f'<span class="wave-name">{wave}</span>' in dom
    assert "6 of 11 online" in dom
    assert "gw-brg" in dom
    assert "&lt;script&gt;alert('gw')&lt;/script&gt;" in dom  # shown as text, not run
    assert '<img src="x"' not in dom
    assert "onerror" not in dom.replace("onerror=alert(1)&gt;", "")
    assert re.search(r'<img id="timeline"[^>]* src="timeline\.svg\?at=', dom)
