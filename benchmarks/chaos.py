"""Chaos: kill the restore at random moments, re-run it as a person would, and audit the ledger.

1. CLI kills: ``restore rehearse --wave core --wave icu`` (time-scaled), ``kill -9`` at a random moment
   after it made progress, then the same command with ``--keep``; N times, then once to the end (when
   a rehearsal ends before its kills ran out, a fresh one takes the rest).
2. Prefect kills: a ``restore-estate`` flow run served by ``restore up``; ``kill -9`` of the serving
   process and its flow run, then ``restore up`` again and the flow run retried (set Scheduled).
3. PostgreSQL: a campaign of the whole estate (1,700 hosts) on a PostgreSQL ledger, without a fault,
   then with every connection terminated twice a second.
4. SQLite under contention: several processes run campaigns of different waves on one SQLite ledger.

After each part, the checks of ``tests/chaos.py`` (the harness the short chaos tests use too): every
host online; the independent audit of the ledger (``restore_flows.ledger.audit``: every transition log
replays, no host wiped twice except an interrupted wipe resumed, no lease, pool claim or stage attempt
left held); every resumed wipe explained in the history; every run closed with an outcome and every
killed run found dead at once ('crashed'). The time from each re-run to its first progress is measured.

    .venv/bin/python benchmarks/chaos.py [--kills 50] [--prefect-kills 5] [--time-scale 0.002] [--seed 1]
        [--rerun-timeout 60] [--postgres-waves WAVES] [--terminate-every 0.5]
        [--skip-cli] [--skip-prefect] [--skip-postgres] [--skip-contention] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from tests.chaos import (
    ROOT,
    Series,
    cli_kills,
    postgres_campaign,
    prefect_kills,
    sqlite_contention,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--inventory", type=Path, default=ROOT / "inventory")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--prefect-kills", type=int, default=5)
    parser.add_argument("--time-scale", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rerun-timeout", type=float, default=60.0, help="seconds a re-run may take to make progress"
    )
    parser.add_argument("--waves", default="core,icu", help="waves of the CLI and Prefect series")
    parser.add_argument(
        "--postgres-waves", default="", help="waves of the PostgreSQL campaigns (default: all, 1,700 hosts)"
    )
    parser.add_argument("--terminate-every", type=float, default=0.5, help="seconds between terminations")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "RESTORE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in this directory and keep it (logs, ledgers)"
    )
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-prefect", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-contention", action="store_true")
    args = parser.parse_args()
    inventory = args.inventory.resolve()
    waves = args.waves.split(",")
    pg_waves = [w for w in args.postgres_waves.split(",") if w]
    results: list[Series] = []

    def done(series: Series) -> None:
        results.append(series)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\n{series.summary()}\n(load average at the end: {load}; {os.cpu_count()} CPU(s))", flush=True)

    with (
        contextlib.nullcontext(str(args.keep))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="restore-chaos-")
    ) as scratch_dir:
        scratch = Path(scratch_dir)
        scratch.mkdir(parents=True, exist_ok=True)
        if not args.skip_cli:
            done(
                cli_kills(
                    inventory,
                    waves,
                    args.kills,
                    scale=args.time_scale,
                    seed=args.seed,
                    scratch=scratch,
                    rerun_timeout=args.rerun_timeout,
                )
            )
        if not args.skip_prefect:
            done(
                prefect_kills(
                    inventory,
                    waves,
                    args.prefect_kills,
                    scale=args.time_scale,
                    seed=args.seed,
                    scratch=scratch,
                    rerun_timeout=max(args.rerun_timeout, 120.0),
                )
            )
        if not args.skip_postgres:
            for every in (None, args.terminate_every):
                name = f"restore_chaos_{os.getpid()}"
                done(postgres_campaign(inventory, pg_waves, args.postgres, terminate_every=every, name=name))
        if not args.skip_contention:
            done(sqlite_contention(inventory, scratch))
    print("\n== targets")
    for series in results:
        found = series.audit
        problems = len(found.problems) if found else "?"
        worst = max(series.progress_seconds, default=0.0)
        verdict = "ok  " if series.ok and worst < 10 else "MISS"
        deadlocks = series.retries.get("DeadlockDetected", 0)
        print(
            f"{verdict} {series.name}: {series.recovered}/{series.kills} kills recovered, "
            f"{series.online}/{series.hosts} online, {problems} audit problem(s), "
            f"{len(series.problems)} other problem(s), {len(series.database_failures)} host(s) failed "
            f"for the database ({deadlocks} deadlock(s) retried), first progress <= {worst:.1f} s"
        )


if __name__ == "__main__":
    main()
