"""Time state changes through the ledger: the sample estate's 1,700 hosts x 10 transitions each.

Each writer is a run of its own with an approval for its share of the hosts; per host it takes the
lease, sends 10 legal events (start_wipe, wipe_done, start_reimage, reimage_done, start_verify,
verify_failed, retry, start_verify, verify_passed, start_release) and gives the lease back. The
figure is transitions per second of wall time, leases included. It is measured with 8 concurrent
writer threads and, as the baseline in the same run, with one writer doing the same work per host
(on the first 425 hosts by default, to keep the whole benchmark near two minutes; use
``--baseline-hosts 1700`` for the identical workload), each on a fresh database holding the whole
estate: SQLite in a temporary file, PostgreSQL in a throw-away database ``restore_bench_<random>``
created on the server of the ledger tests and dropped at the end (skipped, with the reason printed,
when the server is unreachable; override with RESTORE_TEST_POSTGRES_URL). Hosts under forensic hold
get an evidence record first, outside the timing.

    .venv/bin/python benchmarks/ledger_transitions.py [--writers 8] [--baseline-hosts 425] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.states import Event, HostState

POSTGRES_URL = os.environ.get(
    "RESTORE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
INVENTORY = Path(__file__).resolve().parents[1] / "inventory"
EVENTS: tuple[Event, ...] = (
    Event.START_WIPE,
    Event.WIPE_DONE,
    Event.START_REIMAGE,
    Event.REIMAGE_DONE,
    Event.START_VERIFY,
    Event.VERIFY_FAILED,
    Event.RETRY,
    Event.START_VERIFY,
    Event.VERIFY_PASSED,
    Event.START_RELEASE,
)
FINAL_STATE = HostState.RELEASING
TARGETS = {"sqlite": 500.0, "postgresql": 1000.0}
LEASE_SECONDS = 600.0


@dataclass
class Result:
    backend: str
    writers: int
    hosts: int
    transitions: int
    seconds: float
    per_second: float
    errors: int
    locked: int
    first_errors: list[str]


def prepare(engine: Engine, the_plan: Plan) -> tuple[Ledger, list[str]]:
    """Migrate, enroll the sample estate and register evidence for hosts under forensic hold."""
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    hosts = ledger.hosts()
    for host in hosts:
        if host.forensic_hold:
            ledger.add_evidence(host.name, "ab" * 32, f"evidence-store://{host.name}", "benchmark custodian")
    return ledger, [h.name for h in hosts]


def writer(ledger: Ledger, run_id: str, hosts: list[str]) -> tuple[int, list[str]]:
    """One run's work on its hosts; returns (transitions recorded, errors)."""
    done = 0
    errors: list[str] = []
    actor = f"bench:{run_id[:8]}"
    for host in hosts:
        try:
            lease = ledger.acquire(host, run_id, LEASE_SECONDS)
            try:
                for event in EVENTS:
                    ledger.apply(lease, event, actor=actor)
                    done += 1
            finally:
                ledger.release(lease)
        except Exception as exc:
            errors.append(f"{host}: {type(exc).__name__}: {exc}")
    return done, errors


def measure(backend: str, engine: Engine, the_plan: Plan, writers: int, limit: int | None = None) -> Result:
    ledger, everyone = prepare(engine, the_plan)
    hosts = everyone[:limit]
    start_count = ledger.transition_count()
    shares = [hosts[i::writers] for i in range(writers)]
    runs = []
    for number, share in enumerate(shares):
        run_id = ledger.start_run("restore", "benchmark", f"writer-{number}")
        ledger.record_approval(run_id, "benchmark", share, approver="benchmark", shown=f"{len(share)} hosts")
        runs.append(run_id)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=writers) as pool:
        outcomes = list(pool.map(writer, [ledger] * writers, runs, shares))
    seconds = time.perf_counter() - started
    transitions = sum(done for done, _ in outcomes)
    errors = [e for _, errs in outcomes for e in errs]
    recorded = ledger.transition_count() - start_count
    if recorded != transitions:
        errors.append(f"{transitions} transitions reported but {recorded} recorded")
    states = Counter(ledger.states(hosts).values())
    if states != Counter({FINAL_STATE: len(hosts)}):
        errors.append(f"hosts end in {dict(states)}, expected all {FINAL_STATE.value}")
    return Result(
        backend=backend,
        writers=writers,
        hosts=len(hosts),
        transitions=transitions,
        seconds=round(seconds, 2),
        per_second=round(transitions / seconds, 1),
        errors=len(errors),
        locked=sum("database is locked" in e for e in errors),
        first_errors=errors[:5],
    )


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="restore-bench-") as scratch:
        yield f"sqlite:///{Path(scratch) / 'ledger.sqlite3'}"


def postgres_admin() -> tuple[Engine | None, str]:
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        return None, f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}: {exc}"
    return admin, ""


@contextmanager
def postgres_database(admin: Engine) -> Iterator[str]:
    name = f"restore_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def report(result: Result, baseline: Result | None) -> None:
    # The target is for the concurrent writers; the single writer is the baseline they are compared to.
    target = TARGETS[result.backend]
    shown = f">= {target:,.0f}" if baseline else "-"
    verdict = "baseline" if baseline is None else "ok" if result.per_second >= target else "BELOW TARGET"
    if result.errors:
        verdict = "ERRORS"
    ratio = f"{result.per_second / baseline.per_second:>5.2f}x" if baseline else "    -"
    print(
        f"{result.backend:<10} {result.writers:>7} {result.hosts:>6,} {result.transitions:>11,} "
        f"{result.seconds:>8.2f} {result.per_second:>9,.0f} {shown:>9} {ratio} "
        f"{result.errors:>6} {result.locked:>6}  {verdict}",
        flush=True,
    )
    for error in result.first_errors:
        print(f"    {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--writers", type=int, default=8, help="Concurrent writer threads.")
    parser.add_argument(
        "--baseline-hosts", type=int, default=425, help="Hosts the single writer restores (1700: all)."
    )
    parser.add_argument("--json", action="store_true", help="Also print the figures as JSON.")
    args = parser.parse_args()
    the_plan = plan(load_estate(INVENTORY))
    results: list[Result] = []
    print(
        f"{'backend':<10} {'writers':>7} {'hosts':>6} {'transitions':>11} {'seconds':>8} {'per s':>9} "
        f"{'target':>9} {'vs 1':>6} {'errors':>6} {'locked':>6}"
    )
    admin, reason = postgres_admin()
    backends = ["sqlite", "postgresql"] if admin is not None else ["sqlite"]
    try:
        for backend in backends:
            baseline: Result | None = None
            for writers, limit in ((1, args.baseline_hosts), (args.writers, None)):
                if backend == "sqlite":
                    database = sqlite_database()
                else:
                    assert admin is not None
                    database = postgres_database(admin)
                with database as url:
                    engine = make_engine(url)
                    try:
                        result = measure(backend, engine, the_plan, writers, limit)
                    finally:
                        engine.dispose()
                report(result, baseline)
                results.append(result)
                baseline = baseline or result
    finally:
        if admin is not None:
            admin.dispose()
    if reason:
        print(f"postgresql skipped: {reason}")
    if args.json:
        print(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
