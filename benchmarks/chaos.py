"""Chaos: kill the restore at random moments, re-run it as a person would, and audit the ledger.

1. CLI kills: ``restore rehearse --wave core --wave icu`` (time-scaled), ``kill -9`` at a random moment
   after it made progress, then the same command with ``--keep``; N times, then once to the end.
2. Prefect kills: a ``restore-estate`` flow run served by ``restore up``; ``kill -9`` of the serving
   process and its flow run, then ``restore up`` again and the flow run retried (set Scheduled).
3. PostgreSQL: a campaign on a PostgreSQL ledger while every connection is terminated twice a second.
4. SQLite under contention: several processes run campaigns of different waves on one SQLite ledger.

After each part an independent audit of the ledger (``restore_flows.ledger.audit``): every host online,
every transition log replays, no host wiped twice except an interrupted wipe resumed, no lease, pool
claim or stage attempt left held. The time from each re-run to its first progress is measured.

    .venv/bin/python benchmarks/chaos.py [--kills 50] [--prefect-kills 5] [--time-scale 0.002] [--seed 1]
        [--skip-prefect] [--skip-postgres] [--skip-contention]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from restore_flows.ledger.audit import Audit, audit
from restore_flows.ledger.db import make_engine

ROOT = Path(__file__).resolve().parents[1]
RESTORE = [sys.executable, "-m", "restore_flows"]


@dataclass
class Series:
    name: str
    kills: int = 0
    recovered: int = 0
    progress_seconds: list[float] = field(default_factory=list)
    """Per re-run: seconds from its start to the first transition it recorded."""
    audit: Audit | None = None
    online: int = 0
    hosts: int = 0
    notes: list[str] = field(default_factory=list)

    def print(self) -> None:
        found = self.audit
        first = (
            f"first progress after a re-run: median {statistics.median(self.progress_seconds):.1f} s, "
            f"max {max(self.progress_seconds):.1f} s"
            if self.progress_seconds
            else "no re-run"
        )
        print(f"\n== {self.name}")
        print(f"kills {self.kills}, recovered {self.recovered}; online {self.online}/{self.hosts}; {first}")
        if found is not None:
            shown = (": " + "; ".join(found.problems[:5])) if found.problems else ""
            print(
                f"audit: {found.hosts} host(s), {found.transitions} transition(s), {found.wipes} wipe(s), "
                f"{found.resumed_wipes} resumed after a crash, {len(found.problems)} problem(s){shown}"
            )
        for note in self.notes:
            print(note)


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _last_transition(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT max(id) FROM transitions").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0] or 0) if row else 0


def _online(path: Path, hosts: list[str]) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        states = dict(db.execute("SELECT name, state FROM hosts"))
    return sum(1 for h in hosts if states.get(h) == "online")


def _wait_progress(path: Path, after: int, process: subprocess.Popen[bytes], timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _last_transition(path) > after:
            return time.monotonic() - started
        if process.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def _hosts_of(inventory: Path, waves: list[str]) -> list[str]:
    from restore_flows.inventory.loader import load_estate
    from restore_flows.planning import plan

    the_plan = plan(load_estate(inventory))
    return [n for w in waves for n in the_plan.wave(w).hosts]


@contextmanager
def _stopped_server_after(home: Path) -> Iterator[None]:
    """The rehearsals share one Prefect server (it survives the kills, as it would in real life)."""
    try:
        yield
    finally:
        record = home / "server.json"
        if record.exists():
            import json

            pid = int(json.loads(record.read_text()).get("pid", 0))
            if pid:
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGINT)


def cli_kills(
    inventory: Path, waves: list[str], kills: int, scale: float, seed: int, scratch: Path
) -> Series:
    rng = random.Random(seed)
    series = Series(f"CLI: restore rehearse {' '.join('--wave ' + w for w in waves)}, kill -9 x {kills}")
    data = scratch / "data"
    env = {
        **os.environ,
        "RESTORE_DATA_DIR": str(data),
        "RESTORE_PREFECT_PORT": str(_port()),
        "PYTHONUNBUFFERED": "1",
    }
    ledger = data / "rehearsal.sqlite3"
    hosts = _hosts_of(inventory, waves)
    series.hosts = len(hosts)
    log = scratch / "cli.log"
    with _stopped_server_after(data / "prefect"), open(log, "ab") as out:
        for attempt in range(kills + 1):
            command = [*RESTORE, "rehearse", str(inventory), *(a for w in waves for a in ("--wave", w))]
            command += ["--time-scale", str(scale)] + (["--keep"] if attempt else [])
            before = _last_transition(ledger)
            process = subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=scratch)
            # The first run also starts the Prefect server: give it the time that takes.
            progress = _wait_progress(ledger, before, process, timeout=180 if attempt == 0 else 60)
            if attempt:
                if progress is None:
                    series.notes.append(f"re-run {attempt}: no progress (exit {process.poll()})")
                else:
                    series.progress_seconds.append(progress)
                    series.recovered += 1
            if attempt < kills and process.poll() is None:
                time.sleep(rng.uniform(0.3, 6.0))
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    series.kills += 1
                process.wait()
            else:
                code = process.wait(timeout=900)
                if code != 0:
                    series.notes.append(f"the last run ended with status {code}")
    series.online = _online(ledger, hosts)
    engine = make_engine(f"sqlite:///{ledger}")
    series.audit = audit(engine, quiet=True)
    engine.dispose()
    return series


def prefect_kills(
    inventory: Path, waves: list[str], kills: int, scale: float, seed: int, scratch: Path
) -> Series:
    """kill -9 of 'restore up' (the serving process and the flow run it runs), then the flow run retried."""
    rng = random.Random(seed)
    series = Series(f"Prefect: restore-estate served by restore up, kill -9 x {kills}, flow run retried")
    data = scratch / "data-up"
    port = _port()
    env = {
        **os.environ,
        "RESTORE_DATA_DIR": str(data),
        "RESTORE_PREFECT_PORT": str(port),
        "RESTORE_INVENTORY": str(inventory),
        "PYTHONUNBUFFERED": "1",
    }
    ledger = data / "rehearsal.sqlite3"
    hosts = _hosts_of(inventory, waves)
    series.hosts = len(hosts)
    log = scratch / "up.log"

    def serve() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([*RESTORE, "up"], env=env, stdout=out, stderr=out, start_new_session=True)

    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    from restore_flows.flows.server import client_settings

    os.environ.update(client_settings(f"http://127.0.0.1:{port}/api", data / "prefect"))
    server_owner = serve()
    with _stopped_server_after(data / "prefect"):
        with get_client(sync_client=True) as client:
            deployment = _deployment(client, "restore-estate/restore-estate")
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"params": {"waves": waves, "time_scale": scale}}
            )
            serving = server_owner
            for attempt in range(kills + 1):
                waited = _progress_of_served(ledger)
                if attempt:
                    if waited is not None:
                        series.progress_seconds.append(waited)
                        series.recovered += 1
                    else:
                        series.notes.append(f"retry {attempt}: no progress in 120 s")
                if attempt == kills:
                    break
                time.sleep(rng.uniform(0.5, 5.0))
                os.killpg(serving.pid, signal.SIGKILL)
                serving.wait()
                series.kills += 1
                serving = serve()
                client.set_flow_run_state(run.id, Scheduled(message="retried after a crash"), force=True)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    break
                time.sleep(1)
            final = client.read_flow_run(run.id).state
            series.notes.append(
                f"flow run ended {final.name if final else '?'}: {final.message if final else ''}"
            )
        os.killpg(serving.pid, signal.SIGINT)
        serving.wait(60)
    _audited(series, ledger, hosts)
    return series


def _audited(series: Series, ledger: Path, hosts: list[str]) -> None:
    series.online = _online(ledger, hosts)
    engine = make_engine(f"sqlite:///{ledger}")
    series.audit = audit(engine, quiet=True)
    engine.dispose()


def _progress_of_served(ledger: Path, timeout: float = 120) -> float | None:
    before = _last_transition(ledger)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _last_transition(ledger) > before:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def _final(client: Any, flow_run_id: Any) -> str:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return f"flow run ended {state.name}: {state.message}"
        time.sleep(1)
    return "flow run did not end within 15 min"


def _deployment(client: Any, name: str) -> Any:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            return client.read_deployment_by_name(name)
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"restore up did not serve {name}")


def postgres_terminations(inventory: Path, waves: list[str], url: str) -> Series:
    from restore_flows.drivers.fake import SimulatedFleet
    from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, Status, run_campaign
    from restore_flows.inventory.loader import load_estate
    from restore_flows.ledger.db import upgrade
    from restore_flows.ledger.repository import Ledger
    from restore_flows.planning import plan
    from restore_flows.scheduling.runner import Retries

    series = Series("PostgreSQL: every connection of the ledger terminated twice a second")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"restore_chaos_{os.getpid()}"
    with admin.connect() as db:
        db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        db.execute(text(f'CREATE DATABASE "{name}"'))
    target = url.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(target)
    try:
        upgrade(engine)
        the_plan = plan(load_estate(inventory))
        ledger = Ledger(engine)
        ledger.sync_inventory(the_plan.estate, the_plan)
        stop = threading.Event()
        cut: list[int] = []

        def terminate() -> None:
            with admin.connect() as db:
                while not stop.wait(0.5):
                    rows = db.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": name},
                    ).all()
                    cut.append(len(rows))

        killer = threading.Thread(target=terminate)
        killer.start()
        try:
            _, summary = run_campaign(
                ledger,
                the_plan,
                SimulatedFleet(),
                Selection(tuple(waves)),
                mode="rehearsal",
                actor="chaos",
                approver=Automatic(),
                settings=CampaignSettings(retries=Retries(backoff_minutes=(0.0,))),
            )
        finally:
            stop.set()
            killer.join()
        series.hosts = len(summary.hosts)
        series.online = summary.count(Status.ONLINE)
        failed = [p for p in summary.hosts.values() if p.status is not Status.ONLINE]
        series.notes.append(f"{sum(cut)} connection(s) terminated; {len(failed)} host(s) not online")
        series.audit = audit(engine, quiet=True)
    finally:
        engine.dispose()
        with admin.connect() as db:
            db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return series


_CONTENDER = """
import sys
from pathlib import Path
from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, run_campaign
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import plan
from restore_flows.scheduling.runner import Retries
the_plan = plan(load_estate(Path(sys.argv[1])))
ledger = Ledger(make_engine(sys.argv[2]))
settings = CampaignSettings(retries=Retries(backoff_minutes=(0.0,)))
_, summary = run_campaign(ledger, the_plan, SimulatedFleet(), Selection((sys.argv[3],)), mode="rehearsal",
    actor="contender", approver=Automatic(), settings=settings)
sys.exit(0 if summary.ok else 1)
"""


def sqlite_contention(inventory: Path, scratch: Path) -> Series:
    from restore_flows.inventory.loader import load_estate
    from restore_flows.ledger.db import upgrade
    from restore_flows.ledger.repository import Ledger
    from restore_flows.planning import plan

    the_plan = plan(load_estate(inventory))
    waves = [w.name for w in the_plan.waves if w.hosts]
    series = Series(f"SQLite: {len(waves)} processes, one wave each, on one ledger at once")
    path = scratch / "contention.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    Ledger(engine).sync_inventory(the_plan.estate, the_plan)
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(inventory), f"sqlite:///{path}", wave],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for wave in waves
    ]
    codes = [p.wait(timeout=1800) for p in processes]
    series.notes.append(f"exit statuses {codes} in {time.monotonic() - started:.0f} s")
    series.hosts = len(the_plan.hosts)
    series.online = _online(path, list(the_plan.hosts))
    series.audit = audit(engine, quiet=True)
    engine.dispose()
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inventory", type=Path, default=ROOT / "inventory")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--prefect-kills", type=int, default=5)
    parser.add_argument("--time-scale", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--waves", default="core,icu")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--skip-prefect", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-contention", action="store_true")
    args = parser.parse_args()
    inventory = args.inventory.resolve()
    waves = args.waves.split(",")
    results: list[Series] = []
    with tempfile.TemporaryDirectory(prefix="restore-chaos-") as scratch_dir:
        scratch = Path(scratch_dir)
        results.append(cli_kills(inventory, waves, args.kills, args.time_scale, args.seed, scratch))
        results[-1].print()
        if not args.skip_prefect:
            results.append(
                prefect_kills(inventory, waves, args.prefect_kills, args.time_scale, args.seed, scratch)
            )
            results[-1].print()
        if not args.skip_postgres:
            results.append(postgres_terminations(inventory, waves, args.postgres))
            results[-1].print()
        if not args.skip_contention:
            results.append(sqlite_contention(inventory, scratch))
            results[-1].print()
    print("\n== targets")
    for series in results:
        found = series.audit
        ok = (
            found is not None
            and found.ok
            and series.online == series.hosts
            and series.recovered == series.kills
        )
        worst = max(series.progress_seconds, default=0.0)
        verdict = "ok  " if ok and worst < 10 else "MISS"
        print(
            f"{verdict} {series.name}: {series.recovered}/{series.kills} kills "
            f"recovered, {series.online}/{series.hosts} online, "
            f"{len(found.problems) if found else '?'} audit problem(s), first progress <= {worst:.1f} s"
        )


if __name__ == "__main__":
    main()
