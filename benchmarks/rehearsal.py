"""Full rehearsal of the sample estate: through a real Prefect server, and with Prefect bypassed.

(a) every wave of the sample estate (1,700 hosts) with zero-duration stages through the restore-wave
    flow against a real local Prefect server (tuned batching);
(b) the same dispatcher and pipeline on a plain bounded thread pool, no Prefect;
then the ratio (a)/(b). Finally the simulated makespan with realistic durations (time-scaled, same
dispatcher) next to its lower bound: the larger of the longest dependency chain and, for each pool,
its total work divided by its capacity.

    .venv/bin/python benchmarks/rehearsal.py [--inventory inventory] [--workers 16] [--scale 0.0005]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.eta import planned_stages, stage_minutes
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.pipeline import PipelineSettings
from restore_flows.planning import Plan, plan
from restore_flows.prefect_server import client_settings, running_server
from restore_flows.waves import WaveRequest, run_wave_threads


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fresh_ledger(path: Path, the_plan: Plan) -> Ledger:
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    return ledger


def bypass(the_plan: Plan, scratch: Path, workers: int, time_scale: float = 0.0) -> float:
    ledger = _fresh_ledger(scratch / f"bypass-{time_scale}.sqlite3", the_plan)
    fleet = SimulatedFleet(time_scale=time_scale)
    started = time.perf_counter()
    for wave in the_plan.waves:
        _, summary = run_wave_threads(
            ledger,
            the_plan,
            fleet,
            WaveRequest(wave.name),
            workers=workers,
            settings=PipelineSettings(backoff_seconds=(0.0,)),
        )
        assert summary.ok, wave.name
    return time.perf_counter() - started


def through_prefect(inventory: Path, scratch: Path, workers: int) -> tuple[float, float]:
    """Returns (server start seconds, rehearsal seconds)."""
    with running_server(scratch / "prefect", port=_port()) as server:
        os.environ.update(client_settings(server.api_url, server.home))
        os.environ["RESTORE_INVENTORY"] = str(inventory)
        os.environ["RESTORE_DATA_DIR"] = str(scratch / "data")
        from restore_flows.flows import EstateParameters, restore_estate

        started = time.perf_counter()
        state = restore_estate(EstateParameters(workers=workers), return_state=True)
        elapsed = time.perf_counter() - started
        assert state.is_completed(), state.message
        return server.started_in, elapsed


def lower_bound_minutes(the_plan: Plan) -> tuple[float, float, str]:
    """(longest chain, busiest pool's work / capacity, that pool) in simulated minutes."""
    estate = the_plan.estate
    own: dict[str, float] = {}
    for name, host in estate.hosts.items():
        own[name] = sum(stage_minutes(host, s) for s in planned_stages(host))
    finish: dict[str, float] = {}
    for wave in the_plan.waves:
        for name in wave.hosts:  # start order: dependencies first
            deps = estate.hosts[name].depends_on
            finish[name] = own[name] + max((finish[d] for d in deps), default=0.0)
    chain = max(finish.values())
    work: dict[str, float] = {}
    for host in estate.hosts.values():
        for stage, pools in host.pools.items():
            for pool in pools:
                work[pool] = work.get(pool, 0.0) + stage_minutes(host, stage)
    busiest = max(work, key=lambda p: work[p] / estate.pools[p].capacity)
    return chain, work[busiest] / estate.pools[busiest].capacity, busiest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inventory", type=Path, default=Path("inventory"))
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--scale", type=float, default=0.0005, help="time scale of the makespan run (0.0005: 1 min = 30 ms)"
    )
    args = parser.parse_args()
    the_plan = plan(load_estate(args.inventory))
    hosts = len(the_plan.hosts)
    with tempfile.TemporaryDirectory(prefix="restore-rehearsal-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        b = bypass(the_plan, scratch, args.workers)
        print(f"(b) dispatcher + pipeline, Prefect bypassed: {hosts:,} hosts in {b:.1f} s", flush=True)
        chain, pool_bound, pool = lower_bound_minutes(the_plan)
        wall = bypass(the_plan, scratch, args.workers, time_scale=args.scale)
        makespan = wall / (60 * args.scale)
        bound = max(chain, pool_bound)
        # The bound ignores that waves run one after another and that at most --workers hosts are
        # worked on at once; with 16 workers the work alone needs about 1,700 x 45 min / 16.
        print(
            f"simulated makespan with realistic durations ({args.workers} workers): {makespan / 60:.1f} h; "
            f"lower bound {bound / 60:.1f} h (longest chain {chain / 60:.1f} h, pool {pool} "
            f"{pool_bound / 60:.1f} h); ratio {makespan / bound:.2f}",
            flush=True,
        )
        # Last: once a flow has run in this process, Prefect's log shipping expects the server.
        start, a = through_prefect(args.inventory.resolve(), scratch, args.workers)
        print(
            f"(a) through a real Prefect server:          {hosts:,} hosts in {a:.1f} s "
            f"(server start {start:.0f} s, not counted)"
        )
        print(f"ratio (a)/(b): {a / b:.2f}   target: (a) < 120 s, ratio <= 2")


if __name__ == "__main__":
    main()
