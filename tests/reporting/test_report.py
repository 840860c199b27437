"""The situation report's page: each section with the ledger's values, every value escaped."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.reporting.pdf import PdfUnavailable
from restore_flows.reporting.report import render_html, situation, write_report
from restore_flows.states import HostState
from tests.execution.conftest import run_threads
from tests.reporting.pagetext import sections
from tests.reporting.scenarios import (
    EVIDENCE_DIGEST,
    HOSTILE_APPROVER,
    HOSTILE_ERROR,
    HOSTILE_LOCATION,
    HOSTILE_REASON,
    Scenario,
)

UTC = dt.UTC


def _page(scenario: Scenario, rehearsal: bool = False) -> str:
    return render_html(situation(scenario.ledger, scenario.plan, rehearsal=rehearsal), tz=UTC)


def test_every_section_is_there(trouble: Scenario) -> None:
    found = sections(_page(trouble))
    assert list(found) == [
        "(top)",
        "Waves: progress and ETA",
        "Needs an operator",
        "Blocked behind them",
        "The estate per site and department",
        "Approvals",
        "Forensic evidence held",
        "Timeline so far",
    ]
    top = found["(top)"].all_text
    assert "Situation report" in top
    assert "6 of 11 hosts (54.5 %)" in top
    assert "2 host(s); 3 blocked behind them" in top


def test_waves_and_sites_carry_the_ledgers_counts(trouble: Scenario) -> None:
    found = sections(_page(trouble))
    # wave, hosts, online %, online, in progress, waiting, operator, blocked, ETA, plan
    icu = found["Waves: progress and ETA"].row("icu")
    assert icu[1:8] == ["8", "50 %", "4", "0", "0", "1", "3"]
    assert icu[8].startswith("4 cannot finish without an operator; the others by")
    core = found["Waves: progress and ETA"].row("core")
    assert core[1:4] == ["1", "100 %", "1"]
    assert core[8].startswith("back ")
    sites = found["The estate per site and department"]
    assert sites.row("brg")[1:8] == ["6", "16.7 %", "1", "0", "0", "2", "3"]  # the site spans two columns
    departments = [r for r in sites.rows if r[0] == "" and r[1] == "icu"]
    assert [r[2:4] for r in departments] == [["4", "100 %"], ["4", "0 %"]]  # arl, then brg


def test_failed_and_held_hosts_with_their_reasons(trouble: Scenario) -> None:
    found = sections(_page(trouble))
    needs = found["Needs an operator"]
    gateway = needs.row("gw-brg")
    assert gateway[1:4] == ["icu", "brg / icu", "failed reimage_failed"]
    assert HOSTILE_ERROR in gateway[5]
    assert gateway[6] == "3"
    held = needs.row("pc-brg-02")
    assert held[3] == "on hold on_hold"
    assert held[4].endswith("ops <night>")
    assert held[5] == HOSTILE_REASON
    blocked = found["Blocked behind them"].all_text
    assert "3 host(s) depend on gw-brg (reimage_failed): ws-brg-01, ws-brg-02, ws-brg-03" in blocked


def test_approvals_say_who_when_what_and_whether_automatic(trouble: Scenario) -> None:
    rows = sections(_page(trouble))["Approvals"].rows
    assert len(rows) == 4
    by_person = [r for r in rows if r[3] == "by a person"]
    assert sorted(r[2] for r in by_person) == ["core", "icu", "rest"]
    assert {r[1] for r in by_person} == {HOSTILE_APPROVER}
    assert {r[2]: r[4] for r in by_person} == {"core": "1", "icu": "8", "rest": "1"}
    automatic = [r for r in rows if r[3] == "automatic (rehearsal)"]
    assert [(r[1], r[2], r[4]) for r in automatic] == [("automatic (rehearsal)", "rest", "1")]
    assert all(re.fullmatch(r"\d\d:\d\d", r[0]) for r in rows)
    icu = next(r for r in by_person if r[2] == "icu")
    assert "Wave icu" in icu[6]  # what the approver was shown


def test_evidence_held(trouble: Scenario) -> None:
    rows = sections(_page(trouble))["Forensic evidence held"].rows
    assert [r[0] for r in rows] == ["dc-01", "gw-brg"]
    assert rows[1][1:5] == ["disk-image", EVIDENCE_DIGEST, HOSTILE_LOCATION, "CERT <team>"]
    assert rows[0][2] == trouble.ledger.history("dc-01").evidence[0].sha256


def test_timeline_so_far(trouble: Scenario) -> None:
    rows = sections(_page(trouble))["Timeline so far"]
    core = rows.row("core")
    assert all(core[i] != "-" for i in (1, 2, 3, 4, 5))  # first stage, online, half, all, last stage
    icu = rows.row("icu")
    assert icu[1] != "-"
    assert icu[3] != "-"  # 4 of 8: half are online
    assert icu[4] == "-"  # not all


def test_every_ledger_value_is_escaped(trouble: Scenario) -> None:
    page = _page(trouble)
    for hostile in (HOSTILE_ERROR, HOSTILE_REASON, HOSTILE_APPROVER, HOSTILE_LOCATION):
        assert hostile not in page
    assert "<script" not in page
    assert "<img" not in page
    assert "<b>RMA" not in page
    assert "&lt;script&gt;alert(&#x27;gw&#x27;)&lt;/script&gt;" in page
    assert "Dr. &lt;i&gt;A.&lt;/i&gt; &quot;Osei&quot; &amp; co" in page
    # Nothing in the page may be fetched from anywhere: no URL but the hostile one, shown as text.
    assert re.findall(r"https?://", page.replace("https://evil.example/", "")) == []
    assert re.findall(r"<[a-z][^>]*\s(?:src|href)\s*=", page) == []


def test_the_rehearsal_ledger_is_said_so(trouble: Scenario) -> None:
    assert "REHEARSAL LEDGER" in _page(trouble, rehearsal=True)
    assert "REHEARSAL" not in _page(trouble, rehearsal=False)


def test_when_every_host_is_back_it_is_the_after_action_report(fresh: Scenario) -> None:
    _run, summary = run_threads(fresh.ledger, fresh.plan, SimulatedFleet())
    assert summary.ok
    found = sections(_page(fresh))
    assert "After-action report" in found["(top)"].all_text
    assert "all hosts are online" in found["(top)"].all_text
    assert "Nothing: no host is stuck." in found["Needs an operator"].all_text
    assert "Blocked behind them" not in found
    for wave in ("core", "icu", "rest"):
        assert found["Timeline so far"].row(wave)[4] != "-"


def test_write_report_writes_html_then_pdf(trouble: Scenario, tmp_path: Path) -> None:
    made: list[tuple[str, Path]] = []
    html_file = tmp_path / "out" / "sitrep.html"
    write_report(
        trouble.ledger,
        trouble.plan,
        html_file,
        tmp_path / "sitrep.pdf",
        pdf=lambda page, path: made.append((page, path)),
    )
    assert made == [(html_file.read_text(encoding="utf-8"), tmp_path / "sitrep.pdf")]
    assert "Situation report" in made[0][0]


def test_the_html_is_kept_when_no_pdf_can_be_made(trouble: Scenario, tmp_path: Path) -> None:
    def missing(page: str, path: Path) -> None:
        raise PdfUnavailable("no renderer")

    with pytest.raises(PdfUnavailable):
        write_report(trouble.ledger, trouble.plan, tmp_path / "r.html", tmp_path / "r.pdf", pdf=missing)
    assert "gw-brg" in (tmp_path / "r.html").read_text(encoding="utf-8")
    assert trouble.ledger.states()["gw-brg"] is HostState.REIMAGE_FAILED  # nothing written to the ledger
