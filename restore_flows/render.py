"""Rich rendering for people: the plan and inventory diagnostics. Machines read ``--json`` instead."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from restore_flows.errors import Diagnostic, Severity
from restore_flows.execution.eta import format_minutes
from restore_flows.inventory.estate import Estate
from restore_flows.inventory.models import HostKind
from restore_flows.planning import Plan, summarize
from restore_flows.scheduling.forecast import Forecast


def diagnostics(console: Console, found: Iterable[Diagnostic]) -> None:
    for diagnostic in found:
        style = "yellow" if diagnostic.severity is Severity.WARNING else "red"
        console.print(Text(str(diagnostic), style=style), soft_wrap=True)


def estate_summary(estate: Estate) -> str:
    servers = sum(1 for h in estate.hosts.values() if h.kind is HostKind.SERVER)
    workstations = len(estate.hosts) - servers
    return (
        f"{len(estate.hosts):,} hosts ({servers:,} servers, {workstations:,} workstations) "
        f"in {len(estate.sites)} sites, {len(estate.waves)} waves, {len(estate.pools)} pools"
    )


def plan(console: Console, the_plan: Plan) -> None:
    hosts = the_plan.estate.hosts
    sites = the_plan.estate.sites
    overview = Table(title="Restore waves, in order", title_justify="left")
    for column in ("#", "wave", "services", "servers", "workstations", "hosts", "pulled forward"):
        overview.add_column(column, justify="right" if column not in ("wave", "services") else "left")
    for number, wave in enumerate(the_plan.waves, start=1):
        counts = summarize(wave, hosts)
        pulled = sum(1 for n in wave.hosts if the_plan.hosts[n].pulled_forward_by)
        overview.add_row(
            str(number),
            wave.name,
            ", ".join(wave.services),
            f"{counts['kind'].get('server', 0):,}",
            f"{counts['kind'].get('workstation', 0):,}",
            f"{len(wave.hosts):,}",
            f"{pulled:,}",
        )
    console.print(overview)

    for number, wave in enumerate(the_plan.waves, start=1):
        if not wave.hosts:
            continue
        counts = summarize(wave, hosts)
        table = Table(title=f"Wave {number}: {wave.name}", title_justify="left")
        table.add_column("site")
        table.add_column("kind of site")
        table.add_column("servers", justify="right")
        table.add_column("workstations", justify="right")
        table.add_column("departments")
        by_site: dict[str, dict[str, int]] = {}
        departments: dict[str, set[str]] = {}
        for name in wave.hosts:
            host = hosts[name]
            by_site.setdefault(host.site, {"server": 0, "workstation": 0})[host.kind.value] += 1
            departments.setdefault(host.site, set()).add(host.department)
        for site in sorted(by_site):
            table.add_row(
                site,
                sites[site].kind.value,
                f"{by_site[site]['server']:,}",
                f"{by_site[site]['workstation']:,}",
                ", ".join(sorted(departments[site])),
            )
        services = ", ".join(f"{s} {n}" for s, n in counts["service"].items())
        gated: Counter[str] = Counter(
            hosts[name].gate_of(dependency).value
            for name in wave.hosts
            for dependency in hosts[name].depends_on
        )
        gates = ", ".join(f"{count:,} before {stage}" for stage, count in sorted(gated.items()))
        console.print(
            Group(
                table,
                Text(f"  by service: {services}", style="dim"),
                Text(f"  dependencies gate: {gates or 'none'}", style="dim"),
            )
        )

    moved = [p for p in the_plan.hosts.values() if p.pulled_forward_by]
    if moved:
        table = Table(title="Pulled forward: restored before their own wave", title_justify="left")
        table.add_column("host")
        table.add_column("own wave")
        table.add_column("restored in")
        table.add_column("because")
        order = {wave.name: i for i, wave in enumerate(the_plan.waves)}
        for planned in sorted(moved, key=lambda p: (order[p.wave], p.name)):
            links = list(planned.pulled_forward_chain)
            hidden = planned.pulled_forward_depth - len(links)
            if hidden > 0:
                links[-1:-1] = [f"... ({hidden:,} more)"]
            chain = " <- ".join(links)
            table.add_row(planned.name, planned.own_wave, planned.wave, f"needed by {chain}")
        console.print(table)
    if the_plan.steps:
        procedure_steps(console, the_plan)
    console.print(estate_summary(the_plan.estate))


def procedure_steps(console: Console, the_plan: Plan) -> None:
    """The procedure steps in the order they can run: what each needs, waits for and gates."""
    table = Table(title="Procedure steps", title_justify="left")
    for column in ("step", "wave", "runs on", "needs", "not before", "gates", "approval"):
        table.add_column(column)
    for name, planned in the_plan.steps.items():
        step = the_plan.estate.procedures[name]
        action = step.action
        where = ", ".join(step.target_hosts) if step.target_hosts else getattr(action, "url", "")
        waits = "; ".join(f"{w.minutes / 60:g} h after {w.step}" for w in step.waits)
        gates = "; ".join(f"{g.selector} ({len(g.hosts):,}) before {g.before.value}" for g in step.gates)
        table.add_row(
            name,
            planned.wave,
            where,
            ", ".join(n.describe() for n in step.needs),
            waits or "-",
            gates or "-",
            "named" if step.approval else "wave's",
        )
    console.print(table)


def status(console: Console, report: dict[str, Any]) -> None:
    estate = report["estate"]
    console.print(
        f"[bold]{estate['percent']}% online[/]: {estate['online']:,} of {estate['total']:,} hosts  "
        + "  ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in estate["buckets"].items())
    )
    for dimension, title in (
        ("waves", "wave"),
        ("sites", "site"),
        ("departments", "department"),
        ("kinds", "kind"),
    ):
        groups = report[dimension]
        states = sorted({s for g in groups.values() for s in g["states"]})
        table = Table(title=f"By {title}", title_justify="left")
        table.add_column(title)
        table.add_column("% online", justify="right")
        table.add_column("total", justify="right")
        with_eta = dimension == "waves"
        if with_eta:
            table.add_column("ETA", justify="right")
        for state in states:
            table.add_column(state.replace("_", " "), justify="right")
        for name, group in groups.items():
            table.add_row(
                name,
                f"{group['percent']:.1f}",
                f"{group['total']:,}",
                *([format_minutes(group.get("eta_minutes"))] if with_eta else []),
                *(f"{group['states'].get(s, 0):,}" if group["states"].get(s) else "" for s in states),
            )
        console.print(table)


def forecast(console: Console, found: Forecast) -> None:
    bound = found.bound.minutes
    ratio = f", {found.makespan_minutes / bound:.2f}x" if found.makespan_minutes is not None and bound else ""
    console.print(
        f"[bold]Forecast ({found.policy})[/]: every chosen host back in "
        f"{format_minutes(found.makespan_minutes)} (lower bound {format_minutes(bound)}: "
        f"{found.bound.because}{ratio})"
    )
    table = Table(title="By wave", title_justify="left")
    for column in ("wave", "hosts", "online now", "back in", "lower bound", "x bound"):
        table.add_column(column, justify="left" if column == "wave" else "right")
    for name, wave in found.waves.items():
        factor = (
            f"{wave.finish_minutes / wave.bound.minutes:.2f}"
            if wave.finish_minutes is not None and wave.bound.minutes
            else ""
        )
        table.add_row(
            name,
            f"{wave.hosts:,}",
            f"{wave.online:,}",
            format_minutes(wave.finish_minutes),
            format_minutes(wave.bound.minutes),
            factor,
        )
    console.print(table)
    if found.unfinished:
        first, why = next(iter(sorted(found.unfinished.items())))
        console.print(
            Text(
                f"{len(found.unfinished):,} host(s) will not come online without an operator "
                f"(first: {first}: {why})",
                style="yellow",
            )
        )


def history(console: Console, report: dict[str, Any]) -> None:
    console.print(
        f"[bold]{report['host']}[/]: {report['state']} (wave {report['wave']}, site {report['site']}, "
        f"{report['kind']}, role {report['role']})"
        + ("  [yellow]forensic hold[/]" if report["forensic_hold"] else "")
        + ("  [dim]retired[/]" if report["retired"] else "")
    )
    if report["lease"]:
        console.print(f"held by run {report['lease']['run']} until {report['lease']['expires']}")
    table = Table(title="Transitions", title_justify="left")
    for column in ("at", "from", "event", "to", "run", "actor", "detail"):
        table.add_column(column)
    for t in report["transitions"]:
        table.add_row(
            t["at"], t["from"] or "", t["event"], t["to"], (t["run"] or "")[:8], t["actor"], t["detail"] or ""
        )
    console.print(table)
    if report["attempts"]:
        table = Table(title="Stage attempts", title_justify="left")
        for column in ("stage", "#", "run", "started", "ended", "outcome", "error", "worker"):
            table.add_column(column)
        for a in report["attempts"]:
            table.add_row(
                a["stage"],
                str(a["number"]),
                (a["run"] or "")[:8],
                a["started"],
                a["ended"] or "",
                a["outcome"],
                a["error"] or "",
                a.get("executed_by") or "",
            )
        console.print(table)
    for e in report["evidence"]:
        console.print(
            f"evidence {e['kind']} sha256:{e['sha256']} at {e['location']}, custodian {e['custodian']} "
            f"({e['at']})"
        )
    for a in report["approvals"]:
        auto = " (automatic, rehearsal)" if a["automatic"] else ""
        console.print(f"approved by {a['approver']} at {a['at']} for run {a['run'][:8]} ({a['scope']}){auto}")


def step_history(console: Console, report: dict[str, Any]) -> None:
    # Text, not markup: names and details are the operators' and the inventory's words.
    console.print(
        Text(f"step {report['step']}: {report['state']}, {report['attempts']} attempt(s)", style="bold")
    )
    if report["error"]:
        console.print(Text(f"last error: {report['error']}", style="yellow"))
    table = Table(title="Log", title_justify="left")
    for column in ("at", "from", "event", "to", "#", "run", "actor", "output", "detail"):
        table.add_column(column)
    for e in report["log"]:
        table.add_row(
            e["at"],
            e["from"] or "",
            e["event"],
            e["to"],
            str(e["attempt"]),
            (e["run"] or "")[:8],
            e["actor"],
            (e["output_sha256"] or "")[:12],
            e["detail"] or "",
        )
    console.print(table)
    for a in report["approvals"]:
        console.print(Text(f"approved by {a['approver']} at {a['at']} (run {(a['run'] or '')[:8]})"))
    for r in report["rotations"]:
        console.print(Text(f"rotated {r['secret']} at {r['at']} by {r['actor']}: {r['fingerprint']}"))
