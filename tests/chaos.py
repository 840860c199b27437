"""The chaos harness: kill the restore at random moments, re-run it as a person would, audit the ledger.

Shared by the short chaos tests (``tests/test_chaos.py``) and the full benchmark
(``benchmarks/chaos.py``); not a test module. Each series returns a ``Series``: what was done to the
restore, and what an independent reading of the ledger found afterwards.

* ``cli_kills``: ``restore rehearse --wave ...``, ``kill -9`` at a random (seeded) moment after it made
  progress, then the same command with ``--keep``; N times, then once to the end.
* ``prefect_kills``: a ``restore-estate`` flow run served by ``restore up``; ``kill -9`` of the serving
  process group (and so of the flow run's process), then ``restore up`` again and the flow run retried
  (set Scheduled, as ``prefect flow-run retry`` or the UI's Retry does).
* ``postgres_campaign``: a campaign on a PostgreSQL ledger, with every connection of the ledger
  terminated (``pg_terminate_backend``) every so often, or none.
* ``sqlite_contention``: one process per wave, each running its campaign on one SQLite ledger at once.

The checks (``check``): every host online; the audit of ``restore_flows.ledger.audit`` (every
transition log replays, no host wiped twice except an interrupted wipe resumed, no lease, pool claim
or stage attempt left held); every resumed wipe is explained in the history ("resumed after the
crash of run R", R the run that started the interrupted wipe); every run closed with an outcome, and
every killed run found dead by its process being gone ("crashed"), not by waiting out its heartbeat.
The time from each re-run to its first recorded transition is measured.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from restore_flows.ledger.audit import Audit, audit
from restore_flows.ledger.db import make_engine, retried
from restore_flows.ledger.tables import RunRow, TransitionRow
from restore_flows.states import Event, HostState

ROOT = Path(__file__).resolve().parents[1]
RESTORE = [sys.executable, "-m", "restore_flows"]
OPERATOR = ("--actor", "chaos harness", "--reason", "rehearsal: the simulated step did not finish")
RUNS = cast(Table, RunRow.__table__)
LOG = cast(Table, TransitionRow.__table__)


@dataclass
class Series:
    name: str
    seed: int | None = None
    kills: int = 0
    recovered: int = 0
    """Re-runs that recorded progress in the ledger within their limit (or, when all that was left
    waited for an operator's decision, ended saying so)."""
    progress_seconds: list[float] = field(default_factory=list)
    """Per re-run: seconds from its start to the first transition it recorded (or to its end, when
    it could only ask for a decision)."""
    audit: Audit | None = None
    online: int = 0
    hosts: int = 0
    problems: list[str] = field(default_factory=list)
    """What the checks beyond the audit found (unexplained resumes, runs left open, ...)."""
    taken_over: int = 0
    """Stages a killed run left running, found by a re-run: resumed, or done from the host's facts."""
    killed_runs: dict[str, str | None] = field(default_factory=dict)
    """Ledger runs of the killed processes, with the outcome the ledger gave them."""
    retries: Counter[str] = field(default_factory=Counter)
    """Ledger transactions run again, by the database error's class (PostgreSQL and contention series)."""
    database_failures: list[str] = field(default_factory=list)
    """Hosts that failed with a database error as their reason."""
    decisions: list[str] = field(default_factory=list)
    """Operator decisions the product asked for and the harness gave, as a person would: a step that
    is not repeatable (a credential reset) interrupted while it ran may have run, and only a person
    may say to run it again ('restore decide rearm'); the run says so and waits for nothing else."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.audit is not None
            and self.audit.ok
            and not self.problems
            and not self.database_failures
            and self.online == self.hosts
            and self.recovered == self.kills
        )

    def summary(self) -> str:
        found = self.audit
        times = sorted(self.progress_seconds)
        first = (
            f"first progress after a re-run: min {times[0]:.1f} s, median {statistics.median(times):.1f} s, "
            f"max {times[-1]:.1f} s"
            if times
            else "no re-run"
        )
        lines = [
            f"== {self.name}" + (f" (seed {self.seed})" if self.seed is not None else ""),
            f"kills {self.kills}, recovered {self.recovered}; online {self.online}/{self.hosts}; {first}",
        ]
        if found is not None:
            shown = (": " + "; ".join(found.problems[:5])) if found.problems else ""
            lines.append(
                f"audit: {found.hosts} host(s), {found.transitions} transition(s), {found.wipes} wipe(s), "
                f"{found.resumed_wipes} resumed after a crash, {len(found.problems)} problem(s){shown}"
            )
        if self.kills:
            lines.append(
                f"stages left running by a killed run and taken over: {self.taken_over}; "
                f"killed runs found dead: {dict(Counter(self.killed_runs.values()))}"
            )
            steps = dict(Counter(self.decisions))
            lines.append(
                f"operator decisions asked for (a non-repeatable step interrupted while it ran), "
                f"given by the harness: {len(self.decisions)}" + (f" {steps}" if steps else "")
            )
        if self.retries or self.database_failures:
            lines.append(
                f"ledger transactions retried: {dict(self.retries) or 0}; "
                f"hosts failed for the database: {len(self.database_failures)}"
            )
        lines += [f"problem: {p}" for p in self.problems[:10]]
        lines += self.notes
        return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- probes of the ledger that never wait on its writers -------------------------------------------------


class Probe:
    """Reads of a ledger while runs write to it and die: SQLite read-only through ``sqlite3`` (it never
    takes the write lock), PostgreSQL through a connection of its own each time (terminations and
    kills do not leave it broken). A ledger not there yet, or half-created, reads as empty."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self._path = Path(parsed.database or "") if parsed.get_backend_name() == "sqlite" else None
        self._engine: Engine | None = None
        if self._path is None:
            self._engine = create_engine(url, poolclass=NullPool)

    def _rows(self, query: str) -> list[Any]:
        try:
            if self._path is not None:
                if not self._path.exists():
                    return []
                with sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=5) as db:
                    return list(db.execute(query))
            assert self._engine is not None
            with self._engine.connect() as db:
                return list(db.execute(text(query)))
        except (sqlite3.Error, DBAPIError):
            return []

    def last_progress(self) -> tuple[int, int]:
        """The last records that are progress: a host's transition (enrolling the inventory's hosts is
        not) and a procedure step's (a re-run marking a dead run's step ``interrupted`` is its answer
        when that step is all that is left: only a person may say whether it ran)."""
        rows = self._rows(
            "SELECT (SELECT max(id) FROM transitions WHERE event <> 'enroll'), (SELECT max(id) FROM step_log)"
        )
        return (int(rows[0][0] or 0), int(rows[0][1] or 0)) if rows else (0, 0)

    def online(self, hosts: Sequence[str]) -> int:
        wanted = set(hosts)
        return sum(1 for r in self._rows("SELECT name FROM hosts WHERE state = 'online'") if r[0] in wanted)

    def interrupted_steps(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT name FROM procedure_steps WHERE state = 'interrupted'")]

    def open_runs(self) -> set[str]:
        return {r[0] for r in self._rows("SELECT id FROM runs WHERE ended_at IS NULL")}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _ended(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return -signal.SIGKILL


ASKED = b"restore decide rearm|done_by_hand"
"""What a run says when it asks an operator about a step that may have run."""


def asked_since(log: Path, offset: int) -> bool:
    """The log says, past ``offset``, that the run asks an operator to decide on a step."""
    with open(log, "rb") as said:
        said.seek(offset)
        return ASKED in said.read()


def wait_progress(
    probe: Probe,
    after: tuple[int, int],
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    asked: Callable[[], bool] = lambda: False,
) -> float | None:
    """Seconds until the ledger records progress past ``after`` (``Probe.last_progress``), or the run
    asks an operator (``asked``: when a step only a person may re-arm is all that is left, that is
    its answer); None if not within ``timeout`` (or the process ended first, having done neither)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        ended = process is not None and process.poll() is not None
        if any(now > then for now, then in zip(probe.last_progress(), after, strict=True)) or asked():
            return time.monotonic() - started
        if ended:
            return None
        time.sleep(0.05)
    return None


def hosts_of(inventory: Path, waves: Sequence[str]) -> list[str]:
    from restore_flows.inventory.loader import load_estate
    from restore_flows.planning import plan

    the_plan = plan(load_estate(inventory))
    chosen = list(waves) or [w.name for w in the_plan.waves]
    return [n for w in chosen for n in the_plan.wave(w).hosts]


# -- the independent checks ----------------------------------------------------------------------------


def check(series: Series, engine: Engine, hosts: Sequence[str]) -> None:
    """Read the ledger after a series (or a round of one: the figures add up): fills ``online``,
    ``hosts``, ``audit``, ``problems`` and the killed runs' outcomes. No run may be alive any more."""
    found, states, runs, log = _read(engine)
    series.hosts += len(hosts)
    series.audit = found if series.audit is None else _merged(series.audit, found)
    series.online += sum(1 for h in hosts if states.get(h) == HostState.ONLINE.value)
    for run_id, row in runs.items():
        if row.ended_at is None or not row.outcome:
            series.problems.append(f"run {run_id} was never closed with an outcome")
    for run_id in series.killed_runs:
        if run_id in runs:
            series.killed_runs[run_id] = runs[run_id].outcome
    series.problems += unexplained_resumes(log)
    finished = "the host's facts show it finished"
    series.taken_over += sum(
        1 for e in log if e.event == Event.INTERRUPTED.value or finished in (e.detail or "")
    )


@retried
def _read(engine: Engine) -> tuple[Audit, dict[str, str], dict[str, Any], list[Any]]:
    """Everything the checks read, again if a connection is cut meanwhile (the chaos may go on)."""
    found = audit(engine, quiet=True)
    with engine.connect() as db:
        states = {r.name: r.state for r in db.execute(text("SELECT name, state FROM hosts"))}
        runs = {r.id: r for r in db.execute(select(RUNS.c.id, RUNS.c.ended_at, RUNS.c.outcome))}
        log = db.execute(
            select(LOG.c.host, LOG.c.event, LOG.c.from_state, LOG.c.run_id, LOG.c.detail).order_by(LOG.c.id)
        ).all()
    return found, states, runs, list(log)


def _merged(first: Audit, then: Audit) -> Audit:
    """Two ledgers' audits as one (the rounds of a series)."""
    return Audit(
        hosts=first.hosts + then.hosts,
        transitions=first.transitions + then.transitions,
        wipes=first.wipes + then.wipes,
        resumed_wipes=first.resumed_wipes + then.resumed_wipes,
        problems=first.problems + then.problems,
    )


def unexplained_resumes(log: Sequence[Any]) -> list[str]:
    """Every wipe started again after an interrupted one must say so in the history: the retry that
    precedes it reads 'resumed after the crash of run R', R the run that started the interrupted wipe."""
    problems: list[str] = []
    wiping_run: dict[str, str | None] = {}
    interrupted: dict[str, str | None] = {}
    explained: set[str] = set()
    for entry in log:
        host = entry.host
        if entry.event == Event.START_WIPE.value:
            if host in interrupted:
                if host not in explained:
                    problems.append(f"{host}: wiped again after an interrupted wipe, with no word of why")
                interrupted.pop(host)
                explained.discard(host)
            wiping_run[host] = entry.run_id
        elif entry.event == Event.INTERRUPTED.value and entry.from_state == HostState.WIPING.value:
            interrupted[host] = wiping_run.get(host)
        elif (
            entry.event == Event.RETRY.value
            and host in interrupted
            and f"resumed after the crash of run {interrupted[host]}" in (entry.detail or "")
        ):
            explained.add(host)
    return problems


# -- kill -9 of the CLI --------------------------------------------------------------------------------


@contextmanager
def _stopped_server_after(home: Path) -> Iterator[None]:
    """A server a series' first run started survives the kills (as it would in real life); the last
    run stops it, and if it could not, this does."""
    try:
        yield
    finally:
        record = home / "server.json"
        if record.exists():
            pid = int(json.loads(record.read_text()).get("pid", 0))
            if pid:
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGINT)


def cli_kills(
    inventory: Path,
    waves: Sequence[str],
    kills: int,
    *,
    scale: float,
    seed: int,
    scratch: Path,
    ledger_url: str | None = None,
    env: Mapping[str, str] | None = None,
    window: tuple[float, float] = (0.3, 6.0),
    start_timeout: float = 180.0,
    rerun_timeout: float = 60.0,
    finish_timeout: float = 900.0,
) -> Series:
    """``restore rehearse`` killed ``kills`` times, each at a moment drawn from ``window`` (seconds after
    the run's first progress), each followed by the same command with ``--keep``; the last one runs to
    its end. When a run ends before its moment comes (the rehearsal is over: every host back), its
    ledger is checked and a fresh rehearsal takes the remaining kills: a *round* per rehearsal.

    ``ledger_url``: the rehearsal ledger (default: SQLite in the data directory); ``env``: extra
    environment (the port of a Prefect server already running, say)."""
    rng = random.Random(seed)
    chosen = " ".join("--wave " + w for w in waves)
    series = Series(f"CLI: restore rehearse {chosen}, kill -9 x {kills}", seed)
    data = scratch / "data"
    url = ledger_url or f"sqlite:///{data / 'rehearsal.sqlite3'}"
    run_env = {
        **os.environ,
        "RESTORE_DATA_DIR": str(data),
        "RESTORE_REHEARSAL_DATABASE_URL": url,
        "RESTORE_PREFECT_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    probe = Probe(url)
    hosts = hosts_of(inventory, waves)
    base = [*RESTORE, "rehearse", str(inventory), *(a for w in waves for a in ("--wave", w))]
    base += ["--time-scale", str(scale)]
    log = scratch / "cli.log"
    rounds = kills_before_round = 0

    from restore_flows.inventory.loader import load_estate

    # Only these wait for a person; a repeatable step is 'interrupted' for an instant before its run
    # starts it again.
    personal = {n for n, p in load_estate(inventory).procedures.items() if not p.repeatable}

    def rearm(steps: list[str]) -> bool:
        """The run did what it could and ended on steps only a person may re-arm: answer as the
        rehearsal's operator would (the simulated step did not finish), so the same command goes on."""
        steps = [s for s in steps if s in personal]
        for step in steps:
            with open(log, "ab") as said:
                subprocess.run(
                    [*RESTORE, "decide", "rearm", step, "-i", str(inventory), *OPERATOR],
                    env={**run_env, "RESTORE_DATABASE_URL": url},
                    stdout=said,
                    stderr=said,
                    cwd=scratch,
                    check=True,
                    timeout=120,
                )
            series.decisions.append(step)
        return bool(steps)

    with _stopped_server_after(data / "prefect"), open(log, "ab") as out:
        fresh = True
        awaiting = False  # a kill whose re-run is still to be judged
        while True:
            if fresh and rounds:  # empty the last round's ledger first: progress is then any transition
                subprocess.run(
                    [*RESTORE, "rehearse", str(inventory), "--reset"],
                    env=run_env,
                    stdout=out,
                    stderr=out,
                    cwd=scratch,
                    check=True,
                    timeout=120,
                )
            before = probe.last_progress()
            runs_before = probe.open_runs()
            command = base if fresh else [*base, "--keep"]
            offset = log.stat().st_size
            process = subprocess.Popen(command, env=run_env, stdout=out, stderr=out, cwd=scratch)
            progress = wait_progress(
                probe,
                before,
                start_timeout if fresh else rerun_timeout,
                process,
                lambda: asked_since(log, offset),  # noqa: B023 - called before the next launch
            )
            if process.poll() not in (None, 0) and rearm(probe.interrupted_steps()):
                if awaiting:
                    # All that was left waits for the person: asking is this re-run's progress.
                    awaiting = False
                    if progress is None:
                        series.notes.append(f"re-run after kill {series.kills}: no progress, a step left")
                    else:
                        series.recovered += 1
                        series.progress_seconds.append(progress)
                continue  # the same rehearsal goes on: not a new kill, not a new round
            if awaiting:
                awaiting = False
                if progress is None and probe.online(hosts) == len(hosts):
                    # The killed run had just brought the last host back: the re-run finds nothing
                    # left, records nothing, and must end well.
                    code = _ended(process, finish_timeout)
                    series.recovered += code == 0
                    series.notes.append(f"re-run after kill {series.kills}: nothing left to do (exit {code})")
                elif progress is None:
                    ended = process.poll()
                    series.notes.append(f"re-run after kill {series.kills}: no progress (exit {ended})")
                else:
                    series.progress_seconds.append(progress)
                    series.recovered += 1
                    if progress > 10:
                        series.notes.append(f"re-run after kill {series.kills}: progress in {progress:.1f} s")
            # A run that goes on with its other hosts while it asks about a step is answered at once,
            # as an operator at the console would; the step runs in the next run (this one has
            # already counted it out).
            answered = process.poll() is None and rearm(probe.interrupted_steps())
            if series.kills < kills and process.poll() is None:
                time.sleep(rng.uniform(*window))
                if process.poll() is None:
                    victim = probe.open_runs() - runs_before
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    series.kills += 1
                    series.killed_runs.update(dict.fromkeys(victim))
                    fresh = False
                    awaiting = True
                    continue
            try:
                code = process.wait(timeout=finish_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
                series.notes.append(f"a run did not end within {finish_timeout:.0f} s")
            if code != 0 and (rearm(probe.interrupted_steps()) or answered):
                fresh = False
                continue
            if code != 0:
                series.notes.append(f"a run ended with status {code} (see {log.name})")
            rounds += 1
            engine = make_engine(url)
            try:
                check(series, engine, hosts)
            finally:
                engine.dispose()
            if series.kills >= kills:
                break
            if series.kills == kills_before_round:
                series.notes.append("a whole rehearsal ended before a kill: the window is too long for it")
                break
            kills_before_round = series.kills
            fresh = True  # the rehearsal is over: the next kills go to a new one
    probe.close()
    if rounds > 1:
        series.notes.append(f"{rounds} rehearsals in all (each ran to its end before its kills ran out)")
    return series


# -- kill -9 of restore up's flow run, then Prefect's retry -------------------------------------------


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` for the block, and Prefect's settings made from it. Prefect reads
    the environment into its settings once, when first imported: it is told to read it again."""
    from prefect.context import refresh_global_settings_context

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    refresh_global_settings_context()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        refresh_global_settings_context()


def prefect_kills(
    inventory: Path,
    waves: Sequence[str],
    kills: int,
    *,
    scale: float,
    seed: int,
    scratch: Path,
    env: Mapping[str, str] | None = None,
    window: tuple[float, float] = (0.5, 5.0),
    rerun_timeout: float = 120.0,
    finish_timeout: float = 900.0,
) -> Series:
    """kill -9 of 'restore up' (the serving process and the flow run it runs), then the flow run retried.
    A retried flow run continues its ledger run (same approval, leases taken over)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    from restore_flows.flows.server import client_settings, stop_process_group

    rng = random.Random(seed)
    series = Series(
        f"Prefect: restore-estate served by restore up, kill -9 x {kills}, flow run retried", seed
    )
    data = scratch / "data-up"
    run_env = {
        **os.environ,
        "RESTORE_DATA_DIR": str(data),
        "RESTORE_PREFECT_PORT": str(free_port()),
        "RESTORE_DASHBOARD_PORT": str(free_port()),
        "RESTORE_INVENTORY": str(inventory),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    port = run_env["RESTORE_PREFECT_PORT"]
    url = f"sqlite:///{data / 'rehearsal.sqlite3'}"
    probe = Probe(url)
    hosts = hosts_of(inventory, waves)
    log = scratch / "up.log"

    def serve() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [*RESTORE, "up"], env=run_env, stdout=out, stderr=out, cwd=scratch, start_new_session=True
            )

    (data / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect's client warns if its home is missing
    serving = serve()
    try:
        with (
            _stopped_server_after(data / "prefect"),
            _environment(client_settings(f"http://127.0.0.1:{port}/api", data / "prefect")),
            get_client(sync_client=True) as client,
        ):
            deployment = _deployment(client, "restore-estate/restore-estate", serving, waves)
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"params": {"waves": list(waves), "time_scale": scale}}
            )
            for attempt in range(kills + 1):
                before = probe.last_progress()
                if attempt:
                    serving = serve()
                    client.set_flow_run_state(run.id, Scheduled(message="retried after a crash"), force=True)
                waited = wait_progress(probe, before, rerun_timeout if attempt else 180.0)
                if attempt:
                    if waited is not None:
                        series.progress_seconds.append(waited)
                        series.recovered += 1
                    else:
                        series.notes.append(f"retry {attempt}: no progress in {rerun_timeout:.0f} s")
                if attempt == kills:
                    break
                time.sleep(rng.uniform(*window))
                os.killpg(serving.pid, signal.SIGKILL)
                serving.wait()
                series.kills += 1
            series.notes.append(_final(client, run.id, finish_timeout))
    finally:
        stop_process_group(serving, signal.SIGINT, 60)
        probe.close()
    engine = make_engine(url)
    try:
        check(series, engine, hosts)
    finally:
        engine.dispose()
    return series


def _final(client: Any, flow_run_id: Any, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return f"flow run ended {state.name}: {state.message}"
        time.sleep(0.5)
    return f"flow run did not end within {timeout:.0f} s"


def _deployment(client: Any, name: str, serving: subprocess.Popen[bytes], waves: Sequence[str]) -> Any:
    """The deployment as this serve process declared it: on a server shared with other tests, one of the
    same name may be there already, with another inventory's waves in its parameters."""
    deadline = time.monotonic() + 180
    seen = None
    while time.monotonic() < deadline:
        if serving.poll() is not None:
            raise RuntimeError(f"restore up ended (status {serving.returncode}) before serving {name}")
        try:
            found = client.read_deployment_by_name(name)
        except Exception:
            found = None
        if found is not None:
            seen = json.dumps(found.parameter_openapi_schema)
            if all(f'"{wave}"' in seen for wave in waves):
                return found
        time.sleep(0.5)
    if seen is not None:
        raise RuntimeError(f"{name} never offered the waves {list(waves)}: {seen[:2000]}")
    raise RuntimeError(f"restore up did not serve {name} within 180 s")


# -- PostgreSQL: connections terminated mid-run -------------------------------------------------------


@contextmanager
def fresh_database(url: str, name: str) -> Iterator[str]:
    """A database of its own on the server of ``url``, dropped afterwards; yields its URL."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as db:
            db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            db.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as db:
                db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def terminating(url: str, every: float) -> Iterator[list[int]]:
    """``pg_terminate_backend`` of every connection to the database of ``url`` but the terminator's own,
    every ``every`` seconds, in a thread, for the block. Yields the number terminated each time."""
    target = make_url(url)
    admin = create_engine(target, isolation_level="AUTOCOMMIT")
    stop = threading.Event()
    cut: list[int] = []

    def terminate() -> None:
        with admin.connect() as db:
            while not stop.wait(every):
                rows = db.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": target.database},
                ).all()
                cut.append(len(rows))

    killer = threading.Thread(target=terminate, name="pg-terminator", daemon=True)
    killer.start()
    try:
        yield cut
    finally:
        stop.set()
        killer.join(30)
        admin.dispose()


class _RetryCounter(logging.Handler):
    """Counts the ledger's retried transactions by the database error's class (from its log line)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "ledger: %s, retrying %s" and record.args:
            self.counts[str(cast(tuple[Any, ...], record.args)[0])] += 1


@contextmanager
def counting_retries() -> Iterator[Counter[str]]:
    handler = _RetryCounter()
    logger = logging.getLogger("restore_flows.ledger.db")
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever the root logger's level: the retries must be seen
    logger.addHandler(handler)
    try:
        yield handler.counts
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


_DATABASE_WORDS = ("psycopg", "sqlalchemy", "sqlite", "deadlock", "database", "connection", "adminshutdown")


def postgres_campaign(
    inventory: Path, waves: Sequence[str], url: str, *, terminate_every: float | None, name: str
) -> Series:
    """A campaign of ``waves`` (all when empty) on a fresh PostgreSQL database ``name`` of the server of
    ``url``, every connection terminated every ``terminate_every`` seconds (None: never)."""
    from restore_flows.drivers.fake import SimulatedFleet
    from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, Status, run_campaign
    from restore_flows.inventory.loader import load_estate
    from restore_flows.ledger.db import upgrade
    from restore_flows.ledger.repository import Ledger
    from restore_flows.planning import plan
    from restore_flows.scheduling.runner import Retries

    the_plan = plan(load_estate(inventory))
    hosts = hosts_of(inventory, waves)
    cut_how = f"every connection terminated every {terminate_every} s" if terminate_every else "no fault"
    series = Series(f"PostgreSQL: a campaign of {len(hosts):,} hosts, {cut_how}")
    with fresh_database(url, name) as target:
        engine = make_engine(target)
        try:
            upgrade(engine)
            ledger = Ledger(engine)
            ledger.sync_inventory(the_plan.estate, the_plan)
            started = time.monotonic()
            with counting_retries() as retried, _terminating_or_not(target, terminate_every) as cut:
                _, summary = run_campaign(
                    ledger,
                    the_plan,
                    SimulatedFleet(),
                    Selection(tuple(waves)),
                    mode="rehearsal",
                    actor="chaos",
                    approver=Automatic(),
                    # Zero-duration stages: the procedure steps' waits (krbtgt's 10 h) shrink with
                    # them, as in a rehearsal at time scale 0; at pace 1 the campaign waits 10 h.
                    settings=CampaignSettings(retries=Retries(backoff_minutes=(0.0,)), pace=0.0),
                )
            series.retries.update(retried)
            not_online = [p for p in summary.hosts.values() if p.status is not Status.ONLINE]
            series.database_failures = [
                f"{p.host}: {p.error}"
                for p in not_online
                if any(w in (p.error or "").lower() for w in _DATABASE_WORDS)
            ]
            series.notes.append(
                f"{time.monotonic() - started:.0f} s; {sum(cut)} connection(s) terminated; "
                f"{len(not_online)} host(s) not online"
            )
            check(series, engine, hosts)
        finally:
            engine.dispose()
    return series


@contextmanager
def _terminating_or_not(url: str, every: float | None) -> Iterator[list[int]]:
    if every is None:
        yield []
        return
    with terminating(url, every) as cut:
        yield cut


# -- SQLite under contention: several processes, one ledger --------------------------------------------

_CONTENDER = """
import json, logging, sys
from collections import Counter
from pathlib import Path
from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, run_campaign
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, retried
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import plan
from restore_flows.scheduling.runner import Retries
from tests.chaos import counting_retries
logging.basicConfig(level=logging.ERROR)
the_plan = plan(load_estate(Path(sys.argv[1])))
ledger = Ledger(make_engine(sys.argv[2], busy_timeout_ms=int(sys.argv[4])))
# Zero-duration stages, and so zero waits between procedure steps (pace 0, as a rehearsal at time scale 0).
settings = CampaignSettings(
    retries=Retries(backoff_minutes=(0.0,)), poll_seconds=float(sys.argv[5]), pace=0.0
)
with counting_retries() as retried:
    _, summary = run_campaign(ledger, the_plan, SimulatedFleet(), Selection((sys.argv[3],)),
        mode="rehearsal", actor="contender", approver=Automatic(), settings=settings)
print("RETRIED", json.dumps(retried), flush=True)
for p in summary.hosts.values():
    if p.error:
        print("ERROR", p.host, repr(p.error), flush=True)
sys.exit(0 if summary.ok else 1)
"""


def sqlite_contention(
    inventory: Path,
    scratch: Path,
    *,
    busy_timeout_ms: int = 30_000,
    poll_seconds: float = 0.5,
    timeout: float = 1800.0,
) -> Series:
    """One process per wave, each its own campaign, all at once on one SQLite ledger. A short
    ``busy_timeout_ms`` makes writers of other processes give up waiting ('database is locked'), which
    the ledger must retry, never fail a host for."""
    from restore_flows.inventory.loader import load_estate
    from restore_flows.ledger.db import upgrade
    from restore_flows.ledger.repository import Ledger
    from restore_flows.planning import plan

    the_plan = plan(load_estate(inventory))
    waves = [w.name for w in the_plan.waves if w.hosts]
    series = Series(
        f"SQLite: {len(waves)} processes, one wave each, on one ledger at once "
        f"(busy timeout {busy_timeout_ms} ms)"
    )
    path = scratch / "contention.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    try:
        upgrade(engine)
        Ledger(engine).sync_inventory(the_plan.estate, the_plan)
        started = time.monotonic()
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _CONTENDER,
                    str(inventory),
                    f"sqlite:///{path}",
                    wave,
                    str(busy_timeout_ms),
                    str(poll_seconds),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for wave in waves
        ]
        codes: list[int | None] = []
        for process in processes:
            try:
                out, _ = process.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                process.kill()
                out, _ = process.communicate()
            codes.append(process.returncode)
            for line in out.decode(errors="replace").splitlines():
                if line.startswith("RETRIED "):
                    series.retries.update(json.loads(line.removeprefix("RETRIED ")))
                elif line.startswith("ERROR "):
                    if any(w in line.lower() for w in _DATABASE_WORDS):
                        series.database_failures.append(line.removeprefix("ERROR "))
                elif "Traceback" in line:
                    series.problems.append(f"a contender printed a traceback: {out.decode()[-2000:]}")
        series.notes.append(f"exit statuses {codes} in {time.monotonic() - started:.0f} s")
        if any(code != 0 for code in codes):
            series.problems.append(f"a contender failed: exit statuses {codes}")
        check(series, engine, list(the_plan.hosts))
    finally:
        engine.dispose()
    return series
