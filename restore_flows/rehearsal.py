"""``restore rehearse`` and ``restore up``: a local Prefect server, the flows, and a terminal view.

Rehearsals write to their own ledger (``data/rehearsal.sqlite3`` by default), started afresh each
time unless asked to continue, so that a rehearsal never marks a real host online.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from restore_flows.errors import UsageError
from restore_flows.flows.server import SharedServer, client_settings, shared_server
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import current_revision, downgrade, head_revision, make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.settings import Settings
from restore_flows.states import FAILED, HostState


@contextmanager
def local_server(settings: Settings, console: Console) -> Iterator[SharedServer]:
    """The local Prefect server: the one already running, or one started now and left to boot
    while the caller goes on (:meth:`SharedServer.ready` waits for it). This process's Prefect
    settings name it from here on."""

    def starting() -> None:
        console.print(
            f"starting the Prefect server on {settings.prefect_host}:{settings.prefect_port} "
            "(about 20-40 s the first time)..."
        )

    with shared_server(
        settings.prefect_home,
        host=settings.prefect_host,
        port=settings.prefect_port,
        database_url=settings.prefect_database_url,
        on_start=starting,
    ) as server:
        os.environ.update(client_settings(server.api_url, settings.prefect_home))
        yield server


@contextmanager
def prefect_api(settings: Settings, console: Console) -> Iterator[str]:
    """The API URL of a healthy local Prefect server: the one already running, or one started now."""
    with local_server(settings, console) as server:
        console.print(server.ready())
        yield server.api_url


def reset_rehearsal_ledger(settings: Settings) -> None:
    """Start the rehearsal ledger afresh, unless a rehearsal that is still alive uses it."""
    url = settings.ledger_url(rehearsal=True)
    _refuse_if_in_use(settings, url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        for suffix in ("", "-wal", "-shm"):
            Path(parsed.database + suffix).unlink(missing_ok=True)
        return
    engine = make_engine(url)
    try:
        upgrade(engine)
        downgrade(engine, "base")
    finally:
        engine.dispose()


def _refuse_if_in_use(settings: Settings, url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        return
    engine = make_engine(url)
    try:
        if current_revision(engine) != head_revision():
            return  # not a ledger this code can read: nothing of ours runs on it
        ledger = Ledger(engine, stale_seconds=settings.run_stale_seconds)
        alive = [run for run in ledger.runs(open_only=True) if run.alive]
    finally:
        engine.dispose()
    if alive:
        run = alive[-1]
        raise UsageError(
            f"a rehearsal is running on this rehearsal ledger (run {run.id}, {run.scope}, process "
            f"{run.process}): wait for it to end, or rehearse elsewhere (RESTORE_DATA_DIR or "
            "RESTORE_REHEARSAL_DATABASE_URL)"
        )


def rehearse(
    settings: Settings,
    console: Console,
    *,
    waves: Sequence[str],
    time_scale: float,
    fail_rate: float,
    seed: int,
    fresh: bool,
    duration_noise: float = 0.0,
) -> bool:
    """Run the estate (or some waves) as one campaign through the flows; True when all came online."""
    the_plan = plan(load_estate(settings.inventory, settings.max_hosts))
    chosen = list(waves) or [w.name for w in the_plan.waves if w.hosts]
    unknown = set(chosen) - {w.name for w in the_plan.waves}
    if unknown:
        raise UsageError(f"no such wave: {', '.join(sorted(unknown))}")
    if fresh:
        reset_rehearsal_ledger(settings)
    os.environ["RESTORE_INVENTORY"] = str(settings.inventory)
    os.environ["RESTORE_DATA_DIR"] = str(settings.data_dir)
    # The terminal shows the progress bars; Prefect's per-task lines (still in the UI) would bury them.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    with local_server(settings, console) as server:
        # While a server boots (a few seconds), the flows' imports and the ledger's migrations run:
        # a re-run after a crash that finds no server still makes progress within seconds.
        from restore_flows.flows.restore import EstateParameters, restore_estate

        engine = make_engine(settings.ledger_url(rehearsal=True))
        try:
            upgrade(engine)
            ledger = Ledger(engine)
            console.print(server.ready())
            ui = server.api_url.removesuffix("/api")
            console.print(f"Prefect UI: {ui}/  (runs, artifacts and progress)")
            with LedgerProgress(ledger, the_plan, chosen, console, pace=time_scale):
                state = restore_estate(
                    EstateParameters(
                        waves=list(waves),
                        time_scale=time_scale,
                        fail_rate=fail_rate,
                        duration_noise=duration_noise,
                        seed=seed,
                    ),
                    return_state=True,
                )
            _print_summary(console, ledger, the_plan, chosen)
        finally:
            engine.dispose()
    console.print(f"{state.name}: {state.message}")
    return state.is_completed()


class LedgerProgress:
    """The terminal's view of a rehearsal, drawn from the rehearsal ledger (the truth): a bar per wave
    and a line for the estate with its percentage and ETA (the forecast from the ledger)."""

    def __init__(
        self,
        ledger: Ledger,
        the_plan: Plan,
        waves: Sequence[str],
        console: Console,
        pace: float = 1.0,
    ) -> None:
        self._ledger = ledger
        self._plan = the_plan
        self._pace = pace if pace > 0 else 1.0
        self._members = {w: set(the_plan.wave(w).hosts) for w in waves}
        self._all = set().union(*self._members.values()) if self._members else set()
        self._progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            TextColumn("{task.completed:>5.0f}/{task.total:<5.0f} online"),
            TextColumn("{task.fields[detail]}"),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._eta: dict[str, float | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rehearsal-progress", daemon=True)
        self._forecaster = threading.Thread(target=self._forecast, name="rehearsal-eta", daemon=True)

    def __enter__(self) -> LedgerProgress:
        self._progress.start()
        self._tasks["(estate)"] = self._progress.add_task("estate", total=len(self._all), detail="")
        for wave, members in self._members.items():
            self._tasks[wave] = self._progress.add_task(wave, total=len(members), detail="")
        self._thread.start()
        self._forecaster.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._forecaster.join(10)
        self._refresh()
        self._progress.stop()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._refresh()

    def _forecast(self) -> None:
        """The ETA is the forecast, a fraction of a second of work: every few seconds, on its own."""
        from restore_flows.execution.eta import forecast_from_ledger

        while not self._stop.wait(3.0):
            try:
                found = forecast_from_ledger(self._ledger, self._plan, default_pace=self._pace)
            except Exception:  # the ledger is being created or migrated: try again later
                continue
            self._eta = {name: wave.finish_minutes for name, wave in found.waves.items()}
            self._eta["(estate)"] = found.makespan_minutes

    def _refresh(self) -> None:
        from restore_flows.execution.eta import format_minutes

        try:
            states = self._ledger.states()
        except Exception:  # the ledger is being created or migrated: try again next tick
            return
        for key, members in [("(estate)", self._all), *self._members.items()]:
            counts = Counter(states.get(n, HostState.COMPROMISED) for n in members)
            online = counts[HostState.ONLINE]
            failed = sum(c for s, c in counts.items() if s in FAILED or s is HostState.QUARANTINED)
            busy = len(members) - online - counts[HostState.COMPROMISED] - failed
            parts = [f"{round(100 * online / len(members)) if members else 100} %"]
            if online == len(members):
                parts.append("all back")
            else:
                parts.append(f"{busy} in progress")
                if key in self._eta:
                    parts.append(f"ETA {format_minutes(self._eta[key])}")
            if failed:
                parts.append(f"{failed} need an operator")
            self._progress.update(self._tasks[key], completed=online, detail=" · ".join(parts))


def _print_summary(console: Console, ledger: Ledger, the_plan: Plan, waves: Sequence[str]) -> None:
    states = ledger.states()
    started, online_at = ledger.back_online()
    table = Table(title="Rehearsal summary", title_justify="left")
    for column in ("wave", "hosts", "online", "failed", "not started", "all back after"):
        table.add_column(column, justify="left" if column == "wave" else "right")
    for wave in waves:
        members = the_plan.wave(wave).hosts
        counts = Counter(states[n] for n in members)
        failed = sum(c for s, c in counts.items() if s in FAILED or s is HostState.QUARANTINED)
        back = ""
        if started is not None and members and all(n in online_at for n in members):
            back = f"{(max(online_at[n] for n in members) - started).total_seconds():.1f} s"
        table.add_row(
            wave,
            str(len(members)),
            str(counts[HostState.ONLINE]),
            str(failed),
            str(counts[HostState.COMPROMISED]),
            back,
        )
    console.print(table)
    if the_plan.steps:
        _print_steps(console, ledger, the_plan, started)
    for name in sorted(states):
        if states[name] in FAILED or states[name] is HostState.QUARANTINED:
            history = ledger.history(name)
            last = history.transitions[-1]
            console.print(f"[red]{name}[/]: {states[name].value}: {last.detail or ''}")


def _print_steps(console: Console, ledger: Ledger, the_plan: Plan, started: dt.datetime | None) -> None:
    """The procedure steps in the order they were done, with who approved and what they rotated."""
    from restore_flows.execution.eta import as_utc

    records = ledger.steps.states()
    rotated = Counter(r.step for r in ledger.steps.rotations())
    table = Table(title="Procedure steps", title_justify="left")
    for column in ("step", "state", "done after", "secrets rotated"):
        table.add_column(column, justify="left" if column in ("step", "state") else "right")

    def done_at(name: str) -> float:
        record = records.get(name)
        finished = record.finished_at if record is not None else None
        return finished.timestamp() if finished is not None else float("inf")

    for name in sorted(the_plan.steps, key=done_at):
        record = records.get(name)
        after = ""
        if record is not None and record.finished_at is not None and started is not None:
            after = f"{(as_utc(record.finished_at) - as_utc(started)).total_seconds():.1f} s"
        table.add_row(name, record.state.value if record else "pending", after, str(rotated[name] or ""))
    console.print(table)


def up(settings: Settings, console: Console) -> None:
    """Serve the deployments until interrupted, with a local server started if none is running."""

    def interrupt(_signal: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (a service manager) stops like Ctrl-C: server stopped too

    signal.signal(signal.SIGTERM, interrupt)
    with prefect_api(settings, console) as api_url:
        os.environ["RESTORE_INVENTORY"] = str(settings.inventory)
        from prefect import serve

        from restore_flows.flows.serving import deployments
        from restore_flows.web.dashboard import serve_dashboard

        with serve_dashboard(settings, settings.prefect_host, settings.dashboard_port) as dashboard:
            console.print(
                Text.assemble(
                    ("Ops, the Prefect UI: ", "bold"),
                    f"{api_url.removesuffix('/api')}/  (deployments restore-estate, restore-wave)\n",
                    ("Managers, the live view: ", "bold"),
                    f"{dashboard.url}  (add ?ledger=rehearsal for rehearsals)\nCtrl-C stops serving.",
                )
            )
            serve(*deployments(settings), limit=10, query_seconds=1, print_starting_message=False)
