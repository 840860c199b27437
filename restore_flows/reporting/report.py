"""The situation report for the crisis cell: one printable page (A4) in HTML, and the same as PDF.

While the restore goes on it is the situation report; once every host is back the same function gives
the after-action report. Sections: the estate per wave with its ETA and the timeline against the plan;
per site and department; what needs an operator (failed stages with their last error, holds,
interrupted stages, missing evidence) and what is blocked by it; approvals (who, when, what scope,
automatic or not); forensic evidence held; and when each wave's hosts came online.

From ``restore report [--rehearsal] --html FILE [--pdf FILE]``::

    with open_ledger(settings, rehearsal=rehearsal) as context:
        the_plan = plan(load_estate(settings.inventory))   # or load_and_sync(context, ...)[1]
        write_report(context.ledger, the_plan, html_file, pdf_file, rehearsal=rehearsal)

``PdfUnavailable`` (a ``RestoreError``) says what to install when the PDF cannot be made; the HTML is
written first, so it is there either way. Every value from the ledger is escaped (``markup.tag``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from restore_flows.execution.eta import format_minutes
from restore_flows.ledger import queries
from restore_flows.ledger.queries import ApprovalScope
from restore_flows.ledger.records import EvidenceRecord
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan
from restore_flows.reporting.markup import Markup, join, tag
from restore_flows.reporting.overview import Blocker, Counts, Hold, Overview, overview, plan_pace, planned
from restore_flows.reporting.pdf import html_to_pdf
from restore_flows.reporting.timeline import gantt_svg

PdfWriter = Callable[[str, Path], None]


@dataclass(frozen=True)
class Situation:
    """Everything the report shows, read from the ledger at one moment."""

    view: Overview
    approvals: Sequence[ApprovalScope]
    evidence: Sequence[EvidenceRecord]
    rehearsal: bool

    @property
    def title(self) -> str:
        return "After-action report" if self.view.done else "Situation report"


def situation(
    ledger: Ledger,
    the_plan: Plan,
    *,
    rehearsal: bool = False,
    now: Callable[[], dt.datetime] | None = None,
    default_pace: float | None = None,
) -> Situation:
    """``default_pace``: a rehearsal's time scale, for the plan and for the ETA until stages were seen
    (default: 1.0 for the live ledger; for a rehearsal, the pace its ledger shows)."""
    pace = default_pace if default_pace is not None else plan_pace(ledger, the_plan, rehearsal)
    view = overview(
        ledger,
        the_plan,
        plan_forecast=planned(the_plan, pace),
        now=now,
        default_pace=pace,
    )
    return Situation(view, queries.approvals(ledger), queries.evidence(ledger), rehearsal)


def write_report(
    ledger: Ledger,
    the_plan: Plan,
    html_path: Path,
    pdf_path: Path | None = None,
    *,
    rehearsal: bool = False,
    tz: dt.tzinfo | None = None,
    now: Callable[[], dt.datetime] | None = None,
    default_pace: float | None = None,
    pdf: PdfWriter = html_to_pdf,
) -> Situation:
    """Write the report as HTML to ``html_path`` and, if given, as PDF to ``pdf_path`` (the HTML
    first: if the PDF renderer is missing, ``PdfUnavailable`` is raised with the HTML already there).
    ``tz``: the zone times are shown in (default: this machine's). ``default_pace``: see :func:`situation`.
    ``pdf``: the renderer (tests pass their own)."""
    found = situation(ledger, the_plan, rehearsal=rehearsal, now=now, default_pace=default_pace)
    page = render_html(found, tz=tz)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(page, encoding="utf-8")
    if pdf_path is not None:
        pdf(page, pdf_path)
    return found


def render_html(found: Situation, *, tz: dt.tzinfo | None = None) -> str:
    zone = tz or dt.datetime.now().astimezone().tzinfo
    view = found.view
    when = _Times(zone, view.at)
    title = f"{found.title}: {'rehearsal' if found.rehearsal else 'live'} ledger"
    body = join(
        _header(found, when),
        _waves(view, when),
        _needs_people(view, when),
        _blocked(view),
        _waiting_for(view, when),
        _sites(view),
        _approvals(found.approvals, when),
        _evidence(found.evidence, when),
        _timeline(view, when),
    )
    head = join(
        Markup('<meta charset="utf-8">'),
        tag("title", title),
        tag("style", Markup(_CSS)),
    )
    return "<!DOCTYPE html>\n" + tag("html", tag("head", head), tag("body", body), lang="en") + "\n"


class _Times:
    """Times for people: local, with the day when it is not the report's day."""

    def __init__(self, zone: dt.tzinfo | None, today: dt.datetime) -> None:
        self.zone = zone
        self.today = today.astimezone(zone).date()

    def __call__(self, at: dt.datetime | None, *, seconds: bool = False) -> str:
        if at is None:
            return "-"
        local = at.astimezone(self.zone)
        clock = local.strftime("%H:%M:%S" if seconds else "%H:%M")
        return clock if local.date() == self.today else f"{local.strftime('%a %d %b')} {clock}"

    def full(self, at: dt.datetime) -> str:
        local = at.astimezone(self.zone)
        return f"{local.strftime('%A %d %B %Y, %H:%M')} ({local.strftime('%Z')}, UTC{local.strftime('%z')})"


def _header(found: Situation, when: _Times) -> Markup:
    view = found.view
    estate = view.estate
    needs = [b for b in view.blockers if b.needs_people]
    eta = (
        "all hosts are online"
        if view.done
        else (
            f"all back in {format_minutes(view.eta_minutes)} (at {when(_plus(view.at, view.eta_minutes))})"
            if view.eta_minutes is not None
            else "not every host comes back without an operator (see below)"
        )
    )
    banner = (
        tag("p", "REHEARSAL LEDGER: simulated fleet, not the real estate", class_="banner")
        if found.rehearsal
        else None
    )
    facts = tag(
        "dl",
        tag("dt", "Online"),
        tag("dd", f"{estate.online} of {estate.total} hosts ({estate.percent:g} %)"),
        tag("dt", "ETA"),
        tag("dd", eta),
        tag("dt", "Needs an operator"),
        tag("dd", f"{len(needs)} host(s); {estate.blocked} blocked behind them"),
        tag("dt", "First stage"),
        tag("dd", when(view.started) if view.started else "nothing started yet"),
        class_="facts",
    )
    return join(
        banner,
        tag("h1", found.title),
        tag("p", f"Ledger read at {when.full(view.at)}. Times below are local.", class_="when"),
        facts,
        _legend(),
    )


def _legend() -> Markup:
    items = [("online", "online"), ("in_progress", "in progress"), ("waiting", "waiting")]
    items += [("failed", "needs an operator"), ("blocked", "blocked")]
    return tag(
        "p",
        [tag("span", tag("i", class_=f"swatch {key}"), label, class_="key") for key, label in items],
        class_="legend",
    )


def _bar(counts: Counts) -> Markup:
    """A stacked bar: the share of each bucket, as widths in percent."""
    if not counts.total:
        return tag("div", class_="bar")
    segments = []
    for key in ("online", "in_progress", "waiting", "failed", "blocked"):
        share = 100.0 * getattr(counts, key) / counts.total
        if share:
            segments.append(tag("span", class_=f"seg {key}", style=f"width:{share:.2f}%"))
    return tag("div", segments, class_="bar")


def _count_cells(counts: Counts) -> Markup:
    return join(
        tag("td", counts.total, class_="n"),
        tag("td", tag("span", f"{counts.percent:g} %", class_="num"), _bar(counts), class_="pct"),
        tag("td", counts.online, class_="n"),
        tag("td", counts.in_progress, class_="n"),
        tag("td", counts.waiting, class_="n"),
        tag("td", counts.failed, class_="n bad" if counts.failed else "n"),
        tag("td", counts.blocked, class_="n warn" if counts.blocked else "n"),
    )


_COUNT_HEADS = ("hosts", "online %", "online", "in progress", "waiting", "operator", "blocked")


def _thead(*names: str) -> Markup:
    return tag("thead", tag("tr", [tag("th", name) for name in names]))


def _waves(view: Overview, when: _Times) -> Markup:
    rows = []
    origin = view.started or view.at
    for wave in view.waves:
        if wave.done:
            eta = f"back {when(wave.finished_at)}"
        elif wave.eta_minutes is not None:
            eta = f"{format_minutes(wave.eta_minutes)} ({when(_plus(view.at, wave.eta_minutes))})"
        else:
            others = when(_plus(view.at, wave.eta_others_minutes))
            eta = f"{len(wave.will_not_finish)} cannot finish without an operator; the others by {others}"
        rows.append(
            tag(
                "tr",
                tag("th", wave.name),
                _count_cells(wave.counts),
                tag("td", eta, class_="bad" if not wave.done and wave.eta_minutes is None else None),
                tag("td", when(_plus(origin, wave.planned_finish_minutes))),
            )
        )
    return tag(
        "section",
        tag("h2", "Waves: progress and ETA"),
        tag("table", _thead("wave", *_COUNT_HEADS, "ETA (forecast)", "plan"), tag("tbody", rows)),
        tag(
            "figure",
            gantt_svg(view, inline=True, tz=when.zone),
            tag(
                "figcaption",
                "Outline: the plan from the first stage. Solid: done (green once all back). Striped: "
                "the forecast from now (red dashes: some hosts need an operator). Black line: share "
                "of the wave online. Red line: now.",
            ),
        ),
    )


def _sites(view: Overview) -> Markup:
    rows = []
    for site, departments in view.sites.items():
        total = _sum(departments.values())
        rows.append(tag("tr", tag("th", site, colspan=2), _count_cells(total), class_="site"))
        rows += [
            tag("tr", tag("td", ""), tag("td", department), _count_cells(counts))
            for department, counts in departments.items()
        ]
    return tag(
        "section",
        tag("h2", "The estate per site and department"),
        tag("table", _thead("site", "department", *_COUNT_HEADS), tag("tbody", rows), class_="sites"),
    )


def _sum(groups: Iterable[Counts]) -> Counts:
    items = list(groups)
    return Counts(
        total=sum(c.total for c in items),
        online=sum(c.online for c in items),
        in_progress=sum(c.in_progress for c in items),
        waiting=sum(c.waiting for c in items),
        failed=sum(c.failed for c in items),
        blocked=sum(c.blocked for c in items),
    )


_HOLD_WORDS = {
    Hold.FAILED: "failed",
    Hold.ON_HOLD: "on hold",
    Hold.INTERRUPTED: "interrupted",
    Hold.EVIDENCE: "evidence missing",
}


def _needs_people(view: Overview, when: _Times) -> Markup:
    needs = [b for b in view.blockers if b.needs_people]
    if not needs:
        return tag("section", tag("h2", "Needs an operator"), tag("p", "Nothing: no host is stuck."))
    rows = [
        tag(
            "tr",
            tag("td", b.host, class_="host"),
            tag("td", b.wave),
            tag("td", f"{b.site} / {b.department}"),
            tag("td", _HOLD_WORDS.get(b.hold, b.hold.value), tag("br"), tag("small", b.state.value)),
            tag("td", when(b.since), tag("br"), tag("small", b.actor or "")),
            tag("td", b.reason, class_="reason"),
            tag("td", len(b.holds_back), class_="n"),
        )
        for b in needs
    ]
    return tag(
        "section",
        tag("h2", f"Needs an operator ({len(needs)})"),
        tag(
            "table",
            _thead("host", "wave", "site / dept", "why", "since / by", "last error or reason", "holds back"),
            tag("tbody", rows),
            class_="needs",
        ),
    )


def _blocked(view: Overview) -> Markup:
    roots = [b for b in view.blockers if b.hold in (Hold.FAILED, Hold.ON_HOLD) and b.holds_back]
    if not view.estate.blocked:
        return Markup("")
    items = [
        tag(
            "li",
            tag("strong", f"{len(b.holds_back)} host(s)"),
            " depend on ",
            tag("span", b.host, class_="host"),
            f" ({b.state.value}): ",
            tag("span", ", ".join(b.holds_back), class_="names"),
        )
        for b in roots
    ]
    return tag(
        "section",
        tag("h2", f"Blocked behind them ({view.estate.blocked})"),
        tag("p", "These cannot finish until the host they depend on is retried, fixed or skipped."),
        tag("ul", items, class_="blocked"),
    )


def _waiting_for(view: Overview, when: _Times) -> Markup:
    waited: list[Blocker] = [b for b in view.blockers if b.hold is Hold.DEPENDENCY]
    if not waited:
        return Markup("")
    rows = [
        tag(
            "tr",
            tag("td", b.host, class_="host"),
            tag("td", b.wave),
            tag("td", b.reason),
            tag("td", when(_plus(view.at, b.eta_minutes))),
            tag("td", len(b.holds_back), class_="n"),
        )
        for b in waited[:40]
    ]
    more = tag("p", f"... and {len(waited) - 40} more.") if len(waited) > 40 else None
    return tag(
        "section",
        tag("h2", "Others wait for these (normal progress)"),
        tag(
            "table",
            _thead("dependency", "wave", "doing", "online (forecast)", "hosts waiting"),
            tag("tbody", rows),
        ),
        more,
    )


def _approvals(approvals: Sequence[ApprovalScope], when: _Times) -> Markup:
    if not approvals:
        return tag("section", tag("h2", "Approvals"), tag("p", "No destructive work was approved yet."))
    rows = [
        tag(
            "tr",
            tag("td", when(a.approval.approved_at)),
            tag("td", a.approval.approver, class_="who"),
            tag("td", a.approval.scope),
            tag("td", "automatic (rehearsal)" if a.approval.automatic else "by a person"),
            tag("td", a.hosts, class_="n"),
            tag("td", a.run_mode, tag("br"), tag("small", a.approval.run_id[:8])),
            tag("td", tag("pre", a.approval.shown), class_="shown"),
        )
        for a in approvals
    ]
    return tag(
        "section",
        tag("h2", f"Approvals ({len(approvals)})"),
        tag(
            "table",
            _thead("when", "approver", "scope", "how", "hosts", "run", "what they were shown"),
            tag("tbody", rows),
            class_="approvals",
        ),
    )


def _evidence(records: Sequence[EvidenceRecord], when: _Times) -> Markup:
    if not records:
        return tag("section", tag("h2", "Forensic evidence held"), tag("p", "No evidence recorded."))
    rows = [
        tag(
            "tr",
            tag("td", e.host, class_="host"),
            tag("td", e.kind),
            tag("td", e.sha256, class_="digest"),
            tag("td", e.location, class_="location"),
            tag("td", e.custodian),
            tag("td", when(e.recorded_at)),
        )
        for e in records
    ]
    return tag(
        "section",
        tag("h2", f"Forensic evidence held ({len(records)})"),
        tag(
            "table",
            _thead("host", "kind", "sha256", "location", "custodian", "recorded"),
            tag("tbody", rows),
            class_="evidence",
        ),
    )


def _timeline(view: Overview, when: _Times) -> Markup:
    origin = view.started or view.at
    rows = []
    for wave in view.waves:
        if not wave.counts.total:
            continue
        took = (
            format_minutes((wave.finished_at - wave.first_started).total_seconds() / 60.0)
            if wave.finished_at and wave.first_started
            else "-"
        )
        plan = _plus(origin, wave.planned_finish_minutes)
        late = (
            _signed_minutes((wave.finished_at - plan).total_seconds() / 60.0)
            if wave.finished_at and plan and view.started
            else "-"
        )
        rows.append(
            tag(
                "tr",
                tag("th", wave.name),
                tag("td", when(wave.first_started, seconds=True)),
                tag("td", when(wave.online_times[0] if wave.online_times else None, seconds=True)),
                tag("td", when(wave.online_at(0.5), seconds=True)),
                tag("td", when(wave.finished_at, seconds=True)),
                tag("td", when(wave.last_ended, seconds=True)),
                tag("td", took),
                tag("td", late),
            )
        )
    return tag(
        "section",
        tag("h2", "Timeline so far"),
        tag(
            "table",
            _thead(
                "wave",
                "first stage",
                "first online",
                "half online",
                "all online",
                "last stage end",
                "took",
                "vs plan",
            ),
            tag("tbody", rows),
        ),
    )


def _signed_minutes(minutes: float) -> str:
    # Three seconds: a rehearsal's whole wave may take less than a minute.
    if abs(minutes) < 0.05:
        return "on plan"
    return f"{format_minutes(abs(minutes))} {'late' if minutes > 0 else 'early'}"


def _plus(at: dt.datetime, minutes: float | None) -> dt.datetime | None:
    return None if minutes is None else at + dt.timedelta(minutes=minutes)


# Print first: A4 with page numbers in the margin (WeasyPrint draws @page margin boxes), table headers
# repeated on each page, colours that still read in grey (each bucket also has its own column).
_CSS = """
@page { size: A4; margin: 14mm 12mm 16mm 12mm;
  @bottom-left { content: "restore-orchestrator: situation report"; font: 7pt "DejaVu Sans", sans-serif;
    color: #666; }
  @bottom-right { content: "page " counter(page) " of " counter(pages); font: 7pt "DejaVu Sans", sans-serif;
    color: #666; } }
* { box-sizing: border-box; }
body { font-family: "DejaVu Sans", Verdana, sans-serif; font-size: 8.5pt; color: #111; margin: 0 auto;
  max-width: 200mm; }
h1 { font-size: 17pt; margin: 0 0 2pt; }
h2 { font-size: 11.5pt; margin: 12pt 0 4pt; border-bottom: 1.5pt solid #333; break-after: avoid; }
p.when { margin: 0 0 6pt; color: #444; }
p.banner { background: #ffd54f; border: 1.5pt solid #b28704; padding: 3pt 6pt; font-weight: bold;
  margin: 0 0 6pt; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 1pt 10pt; margin: 0 0 4pt; }
dl.facts dt { font-weight: bold; }
dl.facts dd { margin: 0; }
table { border-collapse: collapse; width: 100%; margin: 0 0 4pt; }
thead { display: table-header-group; }
tr { break-inside: avoid; }
th, td { border-bottom: 0.5pt solid #ccc; padding: 1.5pt 3pt; text-align: left; vertical-align: top; }
thead th { border-bottom: 1pt solid #333; font-size: 7.5pt; color: #333; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.pct { width: 30mm; white-space: nowrap; }
td.bad, .bad { color: #b71c1c; font-weight: bold; }
td.warn { color: #9a4f00; font-weight: bold; }
tr.site th, tr.site td { border-top: 1pt solid #888; font-weight: bold; }
.host, .digest, .location, .names { font-family: "DejaVu Sans Mono", monospace; font-size: 7.5pt; }
.digest, .location, .reason, .names { overflow-wrap: anywhere; word-break: break-all; }
td.reason { max-width: 70mm; }
td.shown pre { white-space: pre-wrap; font-size: 6.5pt; margin: 0; max-width: 70mm; }
small { color: #555; }
td.pct .num { display: inline-block; width: 10mm; }
.bar { display: inline-block; height: 6pt; width: 18mm; background: #eee; vertical-align: middle;
  font-size: 0; white-space: nowrap; }
.seg { display: inline-block; height: 100%; }
.seg.online, .swatch.online { background: #2e7d32; }
.seg.in_progress, .swatch.in_progress { background: #1565c0; }
.seg.waiting, .swatch.waiting { background: #bdbdbd; }
.seg.failed, .swatch.failed { background: #c62828; }
.seg.blocked, .swatch.blocked { background: #ef6c00; }
p.legend { font-size: 7.5pt; color: #333; margin: 2pt 0; }
.key { margin-right: 9pt; white-space: nowrap; }
.swatch { display: inline-block; width: 8pt; height: 6pt; margin-right: 2pt; }
figure { margin: 6pt 0 0; break-inside: avoid; }
figure svg { width: 100%; height: auto; }
figcaption { font-size: 7pt; color: #444; }
ul.blocked { padding-left: 12pt; margin: 0; }
ul.blocked li { margin-bottom: 3pt; }
@media screen { body { padding: 12px; } }
"""
