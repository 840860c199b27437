"""The ``restore`` command. Thin: parse arguments, call the package, print, choose the exit status.

Exit status: 0 success (warnings allowed); 1 the ledger refused (a safety rule, a lease held by a run,
an illegal event); 2 the input cannot be used (inventory errors, bad arguments, an unknown host, a
database that cannot be reached or is not migrated). Expected failures never show a traceback, and
text that came from a user or a file is printed as it is, never read as markup.

Commands that only read (``status``, ``history``, ``forecast``, ``plan``, ``validate``) never write to
the ledger: hosts of the inventory that no run has enrolled yet are shown as compromised.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, ParamSpec

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError

from restore_flows import render
from restore_flows.bootstrap import Context, open_ledger
from restore_flows.errors import InventoryError, LedgerError, RestoreError, UnknownHost, UsageError
from restore_flows.execution.campaign import Status
from restore_flows.execution.eta import estate_status
from restore_flows.inventory.estate import Estate
from restore_flows.inventory.loader import LoadResult, load_inventory
from restore_flows.inventory.schema import write_schema
from restore_flows.ledger import db as ledger_db
from restore_flows.ledger.db import SchemaError
from restore_flows.ledger.status import history_report, step_history_report
from restore_flows.offline import stay_offline
from restore_flows.planning import Plan
from restore_flows.planning import plan as make_plan
from restore_flows.settings import Settings
from restore_flows.states import OPERATOR_EVENTS, STEP_OPERATOR_EVENTS, Event

app = typer.Typer(
    name="restore",
    help="Restore a ransomware-hit estate in clinical-priority waves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

P = ParamSpec("P")
EXIT_REFUSED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


@app.callback()
def _configure(
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            envvar="RESTORE_LOG_LEVEL",
            help="Diagnostics on stderr: DEBUG, INFO, WARNING or ERROR (secrets are never logged).",
        ),
    ] = "WARNING",
) -> None:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # On the handler too: Prefect's loggers are set to INFO of their own and pass their records up
    # here, and every "task run finished" line would otherwise bury the terminal.
    handler.setLevel(level)
    logging.basicConfig(level=level, handlers=[handler])


db_app = typer.Typer(help="The ledger database: migrations and enrolment.", no_args_is_help=True)
evidence_app = typer.Typer(help="Forensic evidence records.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(evidence_app, name="evidence")

InventoryDir = Annotated[
    Path,
    typer.Argument(
        help="Inventory directory: every *.yaml file under it is read and merged.",
        envvar="RESTORE_INVENTORY",
        show_default=True,
    ),
]
InventoryOption = Annotated[
    Path,
    typer.Option(
        "--inventory",
        "-i",
        help="Inventory directory.",
        envvar="RESTORE_INVENTORY",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
RehearsalFlag = Annotated[
    bool, typer.Option("--rehearsal", help="The rehearsal ledger instead of the live one.")
]


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _say(text: str, style: str = "red") -> None:
    """A message on stderr, exactly as written (user text may hold '[...]', which is not markup)."""
    _err().print(Text(text, style=style))


def _fail(text: str, status: int = EXIT_INVALID) -> NoReturn:
    _say(text)
    raise typer.Exit(status)


def _load_or_exit(directory: Path) -> LoadResult:
    result = load_inventory(directory, max_hosts=Settings().max_hosts)
    render.diagnostics(_err(), result.diagnostics)
    if result.estate is None:
        errors = len(result.errors)
        _say(
            f"{errors} error{'s' if errors != 1 else ''} in {len(result.files)} file(s): "
            "the inventory cannot be used until they are fixed",
            "bold red",
        )
        raise typer.Exit(EXIT_INVALID)
    return result


def _estate(directory: Path) -> Estate:
    estate = _load_or_exit(directory).estate
    assert estate is not None
    return estate


def _handled(command: Callable[P, None]) -> Callable[P, None]:
    """Expected failures become a message and an exit status, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except InventoryError as exc:
            render.diagnostics(_err(), exc.diagnostics)
            _fail(f"{exc}: the inventory cannot be used until they are fixed")
        except (SchemaError, UsageError, UnknownHost) as exc:
            _fail(f"error: {exc}")
        except LedgerError as exc:
            _fail(f"refused: {exc}", EXIT_REFUSED)
        except (DBAPIError, ArgumentError) as exc:
            _fail(f"error: the ledger database cannot be used: {_database_problem(exc)}")
        except ValidationError as exc:
            _fail(f"error: {_settings_problem(exc)}")
        except OSError as exc:
            _fail(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        except RestoreError as exc:
            _fail(f"error: {exc}")

    return wrapper


def _settings_problem(exc: ValidationError) -> str:
    """A RESTORE_* variable that does not fit its setting, named as the operator wrote it."""
    problems = []
    for error in exc.errors(include_url=False):
        name = "_".join(str(step) for step in error["loc"])
        variable = f"RESTORE_{name.upper()}" if exc.title == "Settings" else name
        shown = ""
        # URLs and secret names may carry credentials: their values are never repeated.
        if not any(word in name for word in ("url", "secret", "token", "password", "key")):
            shown = f" (got {error.get('input')!r})"
        problems.append(f"{variable}: {error['msg']}{shown}")
    return "; ".join(problems)


def _database_problem(exc: DBAPIError | ArgumentError) -> str:
    if isinstance(exc, DBAPIError):
        first = str(exc.orig).strip().splitlines()
        return first[0] if first else exc.orig.__class__.__name__
    return str(exc).splitlines()[0]


@contextmanager
def _context(rehearsal: bool = False) -> Iterator[Context]:
    with open_ledger(Settings(), rehearsal=rehearsal) as context:
        yield context


@contextmanager
def _engine() -> Iterator[Engine]:
    engine = ledger_db.engine_from_settings(Settings())
    try:
        yield engine
    finally:
        engine.dispose()


def _view(context: Context, inventory: Path) -> Plan:
    """The inventory's plan, to read the ledger with; nothing is written."""
    the_plan = make_plan(_estate(inventory))
    known = set(context.ledger.states())
    missing = sum(1 for name in the_plan.estate.hosts if name not in known)
    if missing:
        _say(
            f"{missing:,} host(s) of the inventory are not in the ledger yet (shown as compromised): "
            "the next run enrolls them, or 'restore db sync'",
            "yellow",
        )
    return the_plan


@app.command()
@_handled
def validate(directory: InventoryDir = Path("inventory")) -> None:
    """Check the inventory and list every mistake with its file and line."""
    result = _load_or_exit(directory)
    assert result.estate is not None
    warnings = len(result.warnings)
    suffix = f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""
    _out().print(Text(f"inventory OK: {render.estate_summary(result.estate)}{suffix}"))


@app.command()
@_handled
def plan(
    directory: InventoryDir = Path("inventory"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show the restore waves: what each contains, and which hosts were pulled forward and why."""
    the_plan = make_plan(_estate(directory))
    if as_json:
        json.dump(the_plan.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render.plan(_out(), the_plan)


@app.command()
@_handled
def schema(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the JSON Schema.")] = Path(
        "schema/inventory.schema.json"
    ),
) -> None:
    """Write the JSON Schema of inventory files, for editors (yaml-language-server)."""
    write_schema(output)
    _out().print(Text(f"wrote {output}"))


@app.command()
@_handled
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write inventory/ and schema/.")] = Path("."),
) -> None:
    """Start from the sample estate: write its inventory/ and schema/ here (never over existing ones)."""
    from restore_flows.sample import write_sample

    for written in write_sample(directory):
        _out().print(Text(f"wrote {written}/"))
    _out().print(Text("next: edit inventory/, then 'restore validate' and 'restore plan'"))


@db_app.command("upgrade")
@_handled
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create or migrate the ledger database (RESTORE_DATABASE_URL; default SQLite in data/)."""
    with _engine() as engine:
        before = ledger_db.current_revision(engine)
        ledger_db.upgrade(engine, revision)
        after = ledger_db.current_revision(engine)
        where = engine.url.render_as_string(hide_password=True)
    _out().print(Text(f"ledger at {where}: revision {before or '(empty)'} -> {after}"))


@db_app.command("current")
@_handled
def db_current() -> None:
    """Show the ledger database's revision and the one this code needs."""
    with _engine() as engine:
        found = ledger_db.current_revision(engine)
    _out().print(Text(f"database: {found or '(not set up)'}; code: {ledger_db.head_revision()}"))


@db_app.command("sync")
@_handled
def db_sync(inventory: InventoryOption = Path("inventory"), rehearsal: RehearsalFlag = False) -> None:
    """Enroll the inventory's new hosts (compromised) and retire those no longer in it."""
    estate = _estate(inventory)
    with _context(rehearsal) as context:
        report = context.ledger.sync_inventory(estate, make_plan(estate))
    out = _out()
    out.print(Text(f"enrolled {len(report.enrolled)} new host(s) as compromised"))
    if report.retired:
        shown = ", ".join(report.retired[:10]) + (" ..." if len(report.retired) > 10 else "")
        out.print(Text(f"retired {len(report.retired)} host(s) no longer in the inventory: {shown}"))
    if report.returned:
        out.print(Text(f"{len(report.returned)} retired host(s) are back in the inventory"))
    for old, new in report.possible_renames:
        _say(
            f"possible rename: {old} is gone and {new} is new (same site, role and kind). They stay "
            f"two hosts: {old}'s history is kept under its name, {new} starts compromised.",
            "yellow",
        )


@db_app.command("audit")
@_handled
def db_audit(rehearsal: RehearsalFlag = False) -> None:
    """Check the ledger's own records: every log replays, no double wipe, nothing left held."""
    from restore_flows.ledger.audit import audit

    with _context(rehearsal) as context:
        found = audit(context.engine, stale_seconds=context.settings.run_stale_seconds)
    _out().print(
        Text(
            f"{found.hosts:,} host(s), {found.transitions:,} transition(s), {found.wipes:,} wipe(s) "
            f"of which {found.resumed_wipes:,} resumed after a crash: "
            + ("no problem" if found.ok else f"{len(found.problems)} problem(s)")
        )
    )
    for problem in found.problems:
        _say(problem)
    if not found.ok:
        raise typer.Exit(EXIT_REFUSED)


@app.command()
@_handled
def status(
    inventory: InventoryOption = Path("inventory"),
    as_json: JsonFlag = False,
    rehearsal: RehearsalFlag = False,
) -> None:
    """Where every host is: counts per state, % online and ETA, per wave, site, department, kind."""
    with _context(rehearsal) as context:
        report = estate_status(context.ledger, _view(context, inventory))
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render.status(_out(), report)


@app.command()
@_handled
def history(
    host: Annotated[str, typer.Argument(help="Host name.")],
    as_json: JsonFlag = False,
    rehearsal: RehearsalFlag = False,
) -> None:
    """What was done to one host (or procedure step), by which run, with whose approval, and what
    evidence was kept (for a step: which secrets it rotated, by fingerprint)."""
    with _context(rehearsal) as context:
        if host in context.ledger.steps.states():
            report = step_history_report(context.ledger.steps.history(host))
            if as_json:
                json.dump(report, sys.stdout, indent=1)
                sys.stdout.write("\n")
            else:
                render.step_history(_out(), report)
            return
        report = history_report(context.ledger.history(host))
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render.history(_out(), report)


def _enrolled(context: Context, inventory: Path, host: str) -> None:
    """An operator's command on one host: enroll it if the inventory has it; touch nothing else."""
    estate = _estate(inventory)
    if host not in estate.hosts:
        raise UnknownHost(f"no host named {host!r} in the inventory")
    context.ledger.sync_inventory(estate, make_plan(estate), only={host})


@evidence_app.command("add")
@_handled
def evidence_add(
    host: Annotated[str, typer.Argument(help="Host the evidence was taken from.")],
    sha256: Annotated[str, typer.Option(help="SHA-256 of the evidence file.")],
    location: Annotated[str, typer.Option(help="Where it is stored (locker, share, drive label).")],
    custodian: Annotated[str, typer.Option(help="Who holds it (name, badge).")],
    kind: Annotated[str, typer.Option(help="disk-image, memory-dump, logs...")] = "disk-image",
    inventory: InventoryOption = Path("inventory"),
) -> None:
    """Register evidence taken by hand by the forensic team; the host may then be wiped."""
    with _context() as context:
        _enrolled(context, inventory, host)
        record = context.ledger.add_evidence(host, sha256, location, custodian, kind)
        state = context.ledger.host(host).state
    _out().print(
        Text(f"evidence {record.kind} sha256:{record.sha256} recorded for {host} (now {state.value})")
    )


OperatorEvent = typer.Argument(
    help="The decision: "
    + ", ".join(sorted(e.value for e in OPERATOR_EVENTS))
    + "; for a procedure step: "
    + ", ".join(sorted(e.value for e in STEP_OPERATOR_EVENTS)),
)


@app.command("decide")
@_handled
def decide(
    event: Annotated[str, OperatorEvent],
    host: Annotated[str, typer.Argument(help="Host name, or procedure step name for rearm/done_by_hand.")],
    actor: Annotated[str, typer.Option("--actor", help="Your name: recorded in the ledger.")],
    reason: Annotated[
        str | None, typer.Option(help="Why (required for hold, skip, recompromise, rearm, done_by_hand).")
    ] = None,
    inventory: InventoryOption = Path("inventory"),
) -> None:
    """An operator's decision on one host (retry or skip a failed stage, hold, release, recompromise)
    or on one procedure step (rearm: run it again; done_by_hand: it was done outside the product)."""
    step_event = next((e for e in STEP_OPERATOR_EVENTS if e.value == event), None)
    if step_event is not None:
        if not reason or not reason.strip():
            raise UsageError(f"{event} needs --reason: a step that may have run is re-armed only with a why")
        estate = _estate(inventory)
        if host not in estate.procedures:
            raise UsageError(f"no procedure step named {host!r} in the inventory")
        with _context() as context:
            context.ledger.steps.sync(estate.procedures)
            step_state = context.ledger.steps.decide(host, step_event, actor=actor, reason=reason)
        _out().print(Text(f"step {host}: {step_event.value} by {actor} -> {step_state.value}"))
        return
    try:
        chosen = Event(event)
    except ValueError:
        chosen = None
    if chosen not in OPERATOR_EVENTS:
        raise UsageError(
            f"'{event}' is not an operator decision; choose one of "
            + ", ".join(
                sorted([*(e.value for e in OPERATOR_EVENTS), *(e.value for e in STEP_OPERATOR_EVENTS)])
            )
        )
    assert chosen is not None
    with _context() as context:
        _enrolled(context, inventory, host)
        state = context.ledger.operator_event(host, chosen, actor=actor, reason=reason)
    _out().print(Text(f"{host}: {chosen.value} by {actor} -> {state.value}"))


@app.command()
@_handled
def rehearse(
    directory: InventoryDir = Path("inventory"),
    wave: Annotated[list[str] | None, typer.Option("--wave", "-w", help="Only these waves (repeat).")] = None,
    time_scale: Annotated[
        float, typer.Option(help="Real seconds per simulated minute / 60: 0 is instant, 1 real time.")
    ] = 0.0,
    fail_rate: Annotated[float, typer.Option(help="Injected failure rate per stage (0 to 1).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the injected failures and noise.")] = 0,
    duration_noise: Annotated[
        float, typer.Option(help="Each stage takes its planned time x (1 +- this), seeded (0 to 0.9).")
    ] = 0.0,
    keep: Annotated[
        bool, typer.Option(help="Continue the last rehearsal instead of starting afresh.")
    ] = False,
    reset: Annotated[
        bool, typer.Option(help="Only start the rehearsal ledger afresh (for the next drill), then stop.")
    ] = False,
) -> None:
    """A full restore rehearsal on the simulated fleet, through a local Prefect server (no UI needed).

    Every chosen wave (all by default) runs as one campaign, as 'restore-estate' does."""
    from restore_flows import rehearsal

    if not (0 <= time_scale <= 10) or not 0 <= fail_rate <= 1 or not 0 <= duration_noise <= 0.9:
        raise UsageError(
            "--time-scale must be within 0..10, --fail-rate within 0..1, --duration-noise within 0..0.9"
        )
    settings = Settings(inventory=directory)
    if reset:
        rehearsal.reset_rehearsal_ledger(settings)
        _out().print(Text(f"the rehearsal ledger is empty: {settings.ledger_url(rehearsal=True)}"))
        return
    estate = _estate(directory)
    known = [w.name for w in estate.waves]
    for name in wave or []:
        if name not in known:
            raise UsageError(f"no wave named {name!r} (waves: {', '.join(known)})")
    ok = rehearsal.rehearse(
        settings,
        _out(),
        waves=wave or [],
        time_scale=time_scale,
        fail_rate=fail_rate,
        seed=seed,
        duration_noise=duration_noise,
        fresh=not keep,
    )
    if not ok:
        raise typer.Exit(EXIT_REFUSED)


@app.command()
@_handled
def report(
    html: Annotated[Path, typer.Option("--html", help="Where to write the report (one printable page).")],
    pdf: Annotated[Path | None, typer.Option("--pdf", help="The same as PDF.")] = None,
    inventory: InventoryOption = Path("inventory"),
    rehearsal: RehearsalFlag = False,
) -> None:
    """The situation report for the crisis cell (and, once all is back, the after-action report)."""
    from restore_flows.reporting.report import write_report

    with _context(rehearsal) as context:
        write_report(context.ledger, _view(context, inventory), html, pdf, rehearsal=rehearsal)
    _out().print(Text(f"wrote {html}" + (f" and {pdf}" if pdf else "")))


@app.command()
@_handled
def up(
    sites: Annotated[
        bool,
        typer.Option(
            "--sites",
            help="A drill of the site mode on this machine: the server on PostgreSQL, one worker per site.",
        ),
    ] = False,
) -> None:
    """Start the local Prefect server and serve the restore deployments; prints the UI address."""
    from restore_flows import rehearsal

    settings = Settings()
    estate = _estate(settings.inventory)
    if sites:
        from restore_flows.flows.sites import up_sites

        up_sites(settings, _out(), sorted(estate.sites))
        return
    rehearsal.up(settings, _out())


@app.command()
@_handled
def worker(
    sites: Annotated[list[str], typer.Argument(help="The site(s) whose hosts this worker drives.")],
    name: Annotated[str | None, typer.Option(help="The worker's name (default: SITE@this-machine).")] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Sessions this worker runs at once (default: two per site: a campaign's, one replacing it).",
        ),
    ] = None,
) -> None:
    """The worker of a site: runs its hosts' stages, from the site's network, as the campaign sends them.

    Talks to the Prefect server at PREFECT_API_URL (default: the local one of the settings) and to the
    ledger of its own settings (RESTORE_DATABASE_URL, RESTORE_REHEARSAL_DATABASE_URL)."""
    from restore_flows.flows.sites import exec_worker

    settings = Settings()
    estate = _estate(settings.inventory)
    strange = [s for s in sites if s not in estate.sites]
    if strange:
        raise UsageError(f"no site named {strange[0]!r} (sites: {', '.join(sorted(estate.sites))})")
    exec_worker(sites, settings, name=name, limit=limit)


@app.command("run")
@_handled
def run_live(
    wave: Annotated[str, typer.Argument(help="The wave to restore on real machines.")],
    directory: InventoryDir = Path("inventory"),
    approver: Annotated[
        str, typer.Option(help="Full name of the person who approves wiping these hosts (recorded).")
    ] = "",
    confirm: Annotated[
        str, typer.Option(help="The wave's name, typed again: the wipe goes ahead only then.")
    ] = "",
    site: Annotated[list[str] | None, typer.Option("--site", help="Only these sites (repeat).")] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="Only these hosts (repeat).")] = None,
    approve_step: Annotated[
        list[str] | None,
        typer.Option(
            "--approve-step",
            help="A procedure step of the wave that needs a named approval, approved by --approver (repeat). "
            "A step due without one is not run: the run ends saying so.",
        ),
    ] = None,
) -> None:
    """A live restore of one wave on real machines: wipe, reimage, verify and release, recorded in the ledger.

    Shows what will be wiped and does nothing unless --approver names a person and --confirm repeats the
    wave's name. Settings (deployment server, management host, secrets) come from RESTORE_* variables.
    """
    from restore_flows.bootstrap import live_fleet, load_and_sync
    from restore_flows.execution.campaign import (
        CampaignSettings,
        Named,
        Selection,
        approval_summary,
        run_campaign,
    )

    _estate(directory)
    settings = Settings(inventory=directory)
    with open_ledger(settings) as context:
        estate, the_plan, _ = load_and_sync(context, directory)
        selection = Selection((wave,), tuple(site or ()), tuple(host or ()))
        try:
            hosts = selection.resolve(the_plan)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        _out().print(Text(approval_summary(the_plan, hosts, context.ledger, wave)))
        steps = selection.steps(the_plan)
        strange = [s for s in approve_step or () if s not in steps]
        if strange:
            raise UsageError(
                f"--approve-step {strange[0]}: not a procedure step of this run "
                f"(its steps: {', '.join(steps) or 'none'})"
            )
        if not approver.strip() or confirm.strip() != wave:
            raise UsageError(
                f"nothing was done: a live run needs --approver 'FULL NAME' and --confirm {wave} "
                "(the wave's name typed again)"
            )
        with live_fleet(settings, estate) as fleet:
            run_id, summary = run_campaign(
                context.ledger,
                the_plan,
                fleet,
                selection,
                mode="live",
                actor=f"cli:{approver.strip()}",
                approver=Named(approver.strip(), approve_step or ()),
                settings=CampaignSettings.from_settings(settings),
            )
    out = _out()
    out.print(Text(f"run {run_id}: {summary.count(Status.ONLINE)} of {len(summary.hosts)} host(s) online"))
    for step in summary.steps.values():
        said = step.error or step.reason or ""
        out.print(Text(f"  step {step.step}: {step.status.value} {said}".rstrip()))
    for progress in sorted(summary.hosts.values(), key=lambda p: p.host):
        if progress.status is not Status.ONLINE:
            why = progress.error or progress.reason or ""
            out.print(
                Text(f"  {progress.host}: {progress.status.value} ({progress.state.value}) {why}".rstrip())
            )
    if not summary.ok:
        raise typer.Exit(EXIT_REFUSED)


@app.command()
@_handled
def forecast(
    directory: InventoryDir = Path("inventory"),
    fresh: Annotated[
        bool, typer.Option(help="As if nothing were restored yet (the plan's durations).")
    ] = False,
    as_json: JsonFlag = False,
    capacity: Annotated[
        list[str] | None, typer.Option("--capacity", help="POOL=N: what if the pool had N slots (repeat).")
    ] = None,
    policy: Annotated[
        str,
        typer.Option(help="campaign (every wave at once) or barrier (SRM-style, one wave after another)."),
    ] = "campaign",
    wave: Annotated[list[str] | None, typer.Option("--wave", "-w", help="Only these waves (repeat).")] = None,
    rehearsal: RehearsalFlag = False,
) -> None:
    """When each wave will be back: the scheduler run on a virtual clock from the ledger's state."""
    from restore_flows.execution.eta import forecast_from_ledger
    from restore_flows.scheduling.forecast import POLICIES, WhatIf
    from restore_flows.scheduling.forecast import forecast as run_forecast

    the_plan = make_plan(_estate(directory))
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}: choose {' or '.join(POLICIES)}")
    pools: dict[str, int] = {}
    for item in capacity or []:
        name, _, value = item.partition("=")
        # ASCII digits only: str.isdigit() also takes '²', which int() then refuses with a traceback.
        digits = value.isascii() and value.isdigit()
        if name not in the_plan.estate.pools or not digits or not 1 <= int(value) <= 100_000:
            raise UsageError(f"--capacity {item!r}: expected POOL=N with a pool of the inventory and N >= 1")
        pools[name] = int(value)
    known = [w.name for w in the_plan.waves]
    for name in wave or []:
        if name not in known:
            raise UsageError(f"no wave named {name!r} (waves: {', '.join(known)})")
    what_if = WhatIf(policy=policy, capacity=pools, waves=tuple(wave or ()))
    if fresh:
        found = run_forecast(the_plan, what_if=what_if)
    else:
        with _context(rehearsal) as context:
            found = forecast_from_ledger(context.ledger, _view(context, directory), what_if)
    if as_json:
        json.dump(found.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render.forecast(_out(), found)


def main() -> None:
    # Before anything loads Prefect (its telemetry starts at import), and for every process started.
    stay_offline()
    try:
        app()
    except KeyboardInterrupt:
        _say("interrupted: what was recorded stays recorded; run the same command again to go on")
        sys.exit(EXIT_INTERRUPTED)
    except RestoreError as exc:  # a command without its own handling: still no traceback
        _say(f"error: {exc}")
        sys.exit(EXIT_INVALID)
