"""The short chaos run: a few ``kill -9`` of a rehearsal at random moments and one of ``restore up``'s flow
run, each followed by the natural re-run; the ledger then read by the independent checks of
``tests/chaos.py`` (the harness ``benchmarks/chaos.py`` runs at full length). Also the ledger under
terminated PostgreSQL connections during the kills, and SQLite under heavy lock contention.

The kill moments come from a seed, printed, and shown on failure: ``RESTORE_CHAOS_SEED=N`` replays the
same moments (the runs' own timing still varies). How fast a re-run makes progress is the benchmark's
figure; here a re-run must make progress long before the killed run's leases would have expired, and
the killed run must be found dead by its process being gone ('crashed'), not by waiting out its
heartbeat ('lost').
"""

from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path

import pytest
import yaml

from restore_flows.flows.server import PrefectServer
from restore_flows.settings import Settings
from tests.chaos import Series, cli_kills, prefect_kills, sqlite_contention, terminating

# Real processes killed and started again, through a real Prefect server: slow, and slower on a busy
# machine, hence a limit above the suite's default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ESTATE = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
pools:
  - {name: imaging-arl, capacity: 6}
roles:
  - {name: dc, kind: server, services: [identity], durations: {wipe: 120, reimage: 5, verify: 2}}
  - name: gw
    kind: server
    services: [icu]
    depends_on: [dc-01]
    durations: {wipe: 120, reimage: 5, verify: 2}
  - name: ws
    kind: workstation
    services: [icu]
    depends_on: [gw-01]
    pools: {wipe: [imaging-arl], reimage: [imaging-arl]}
    durations: {wipe: 120, reimage: 5, verify: 2}
hosts:
  - {name: dc-01, role: dc, site: arl, forensic_hold: true}
  - {name: dc-02, role: dc, site: arl}
  - {name: gw-01, role: gw, site: arl}
groups:
  - defaults: {role: ws, site: arl}
    hosts:
      - name: ws-[01:10]
"""
WAVES = ["core", "icu"]
SCALE = 0.002
"""Real seconds per simulated minute / 60. A wipe (120 planned minutes) lasts 14 s, longer than a re-run
takes to start: a kill finds wipes in flight, and the re-run finds them unfinished (resumed, not done
from the facts). The rest is quick: a rehearsal of the estate above lasts about 40 s."""
KILLS = 3
RERUN_LIMIT = float(Settings.model_fields["lease_seconds"].default) / 2
"""A re-run must make progress within half the lease: on an idle machine it takes seconds (the
benchmark's figure), on a loaded CI machine up to a minute has been seen."""


@pytest.fixture
def seed() -> int:
    chosen = int(os.environ.get("RESTORE_CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
    print(f"chaos seed {chosen} (RESTORE_CHAOS_SEED={chosen} replays these kill moments)")
    return chosen


@pytest.fixture
def estate(tmp_path: Path) -> Path:
    directory = tmp_path / "inventory"
    directory.mkdir()
    (directory / "estate.yaml").write_text(textwrap.dedent(ESTATE))
    return directory


def _server_env(server: PrefectServer) -> dict[str, str]:
    """Runs use the session's Prefect server (found healthy, used, left running: not theirs)."""
    return {"RESTORE_PREFECT_PORT": str(server.port), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def assert_recovered(series: Series) -> None:
    shown = series.summary()
    print(shown)
    assert series.kills >= 1, shown
    assert series.audit is not None, shown
    assert series.audit.ok, shown
    assert not series.problems, shown
    assert series.online == series.hosts, shown
    assert series.recovered == series.kills, shown
    assert series.taken_over >= 1, f"no kill found a stage in flight: the test proves little\n{shown}"
    # Progress (within RERUN_LIMIT, or the re-run counts as not recovered) well before the dead run's
    # leases would have run out: nobody waited for them.
    assert all(seconds < RERUN_LIMIT for seconds in series.progress_seconds), shown


def test_kill_9_of_a_rehearsal_then_the_same_command_again(
    estate: Path, tmp_path: Path, prefect_api: PrefectServer, seed: int
) -> None:
    series = cli_kills(
        estate,
        WAVES,
        KILLS,
        scale=SCALE,
        seed=seed,
        scratch=tmp_path,
        env=_server_env(prefect_api),
        window=(0.5, 4.0),
        rerun_timeout=RERUN_LIMIT,
    )
    assert_recovered(series)
    assert series.killed_runs, series.summary()
    assert set(series.killed_runs.values()) == {"crashed"}, series.summary()


def test_kill_9_of_a_rehearsal_on_postgresql_with_connections_terminated(
    estate: Path, tmp_path: Path, prefect_api: PrefectServer, ledger_url_postgresql: str, seed: int
) -> None:
    """The same on a PostgreSQL ledger, while every connection to it is terminated every 2 s: a killed
    process's transactions are aborted by the server, the survivors' retried."""
    with terminating(ledger_url_postgresql, every=2.0) as cut:
        series = cli_kills(
            estate,
            WAVES,
            2,
            scale=SCALE,
            seed=seed,
            scratch=tmp_path,
            ledger_url=ledger_url_postgresql,
            env=_server_env(prefect_api),
            window=(0.5, 4.0),
            rerun_timeout=RERUN_LIMIT,
        )
    assert sum(cut) > 0, "no connection was terminated: the test proves nothing"
    assert_recovered(series)
    assert set(series.killed_runs.values()) == {"crashed"}, series.summary()


def test_kill_9_of_restore_up_then_the_flow_run_retried(
    estate: Path, tmp_path: Path, prefect_api: PrefectServer, seed: int
) -> None:
    series = prefect_kills(
        estate,
        WAVES,
        1,
        scale=SCALE,
        seed=seed,
        scratch=tmp_path,
        env=_server_env(prefect_api),
        window=(0.5, 4.0),
        rerun_timeout=RERUN_LIMIT,
    )
    assert_recovered(series)
    assert any(note.startswith("flow run ended Completed") for note in series.notes), series.summary()


def test_sqlite_under_heavy_lock_contention(tmp_path: Path) -> None:
    """Five processes, a campaign each, on one SQLite ledger, with no busy timeout at all: a writer that
    finds the lock taken by another process fails at once with 'database is locked', and the ledger
    must run the transaction again, never fail a host for it."""
    waves = [f"w{n}" for n in range(5)]
    estate = {
        "waves": [{"name": w, "services": [w]} for w in waves] + [{"name": "rest", "services": ["*"]}],
        "sites": [{"name": "arl", "kind": "hospital"}],
        "pools": [{"name": "imaging-arl", "capacity": 20}],
        "roles": [
            {
                "name": f"ws-{w}",
                "kind": "workstation",
                "services": [w],
                "pools": {"wipe": ["imaging-arl"], "reimage": ["imaging-arl"]},
            }
            for w in waves
        ],
        "groups": [
            {"defaults": {"role": f"ws-{w}", "site": "arl"}, "hosts": [{"name": f"{w}-ws-[001:040]"}]}
            for w in waves
        ],
    }
    directory = tmp_path / "inventory"
    directory.mkdir()
    (directory / "estate.yaml").write_text(yaml.safe_dump(estate, sort_keys=False))
    series = sqlite_contention(directory, tmp_path, busy_timeout_ms=0, poll_seconds=0.05, timeout=240)
    shown = series.summary()
    print(shown)
    assert series.retries, f"no writer ever found the lock taken: the test proves nothing\n{shown}"
    assert not series.database_failures, shown
    assert series.audit is not None, shown
    assert series.audit.ok, shown
    assert not series.problems, shown
    assert series.online == series.hosts == 5 * 40, shown
