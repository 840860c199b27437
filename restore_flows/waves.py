"""Running a wave: ledger run, approval, dispatch of the pipeline per host. No Prefect here.

The Prefect flows call the same pieces (their tasks wrap ``HostPipeline.run``); ``run_wave_threads``
runs them on a bounded thread pool instead, for tests and to measure what Prefect adds.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from restore_flows.dispatch import Dispatcher, HostProgress, RunSummary
from restore_flows.drivers.base import Fleet
from restore_flows.inventory.estate import Host
from restore_flows.ledger.repository import Ledger
from restore_flows.pipeline import HostOutcome, HostPipeline, PipelineSettings
from restore_flows.planning import Plan


@dataclass(frozen=True)
class WaveRequest:
    wave: str
    mode: str = "rehearsal"
    sites: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    actor: str = "restore-orchestrator"


def select_hosts(the_plan: Plan, request: WaveRequest) -> list[str]:
    """The wave's hosts, narrowed to sites and/or hosts if asked, in start order."""
    wave = the_plan.wave(request.wave)
    names = list(wave.hosts)
    if request.sites:
        names = [n for n in names if the_plan.estate.hosts[n].site in request.sites]
    if request.hosts:
        wanted = set(request.hosts)
        unknown = wanted - set(wave.hosts)
        if unknown:
            raise ValueError(f"not in wave {request.wave}: {', '.join(sorted(unknown))}")
        names = [n for n in names if n in wanted]
    return names


def approval_summary(the_plan: Plan, hosts: Sequence[str], ledger: Ledger) -> str:
    """What an approver is shown before the first wipe: counts per site and kind, forensic holds."""
    estate = the_plan.estate
    per = Counter((estate.hosts[n].site, estate.hosts[n].kind.value) for n in hosts)
    lines = [f"{len(hosts)} host(s) will be wiped and rebuilt:"]
    lines += [f"- {site}: {count} {kind}(s)" for (site, kind), count in sorted(per.items())]
    held = [n for n in hosts if estate.hosts[n].forensic_hold]
    if held:
        lines.append("Under forensic hold:")
        lines += [
            f"- {n}: evidence {'registered' if ledger.has_evidence(n) else 'NOT yet registered'}"
            for n in held
        ]
    return "\n".join(lines)


def priority_of(the_plan: Plan) -> Callable[[Host], int]:
    """Smaller first: earlier wave, then earlier in the wave's start order (clinical priority)."""
    rank: dict[str, int] = {}
    for index, wave in enumerate(the_plan.waves):
        for position, name in enumerate(wave.hosts):
            rank[name] = index * 1_000_000 + position
    return lambda host: rank[host.name]


def run_wave_threads(
    ledger: Ledger,
    the_plan: Plan,
    fleet: Fleet,
    request: WaveRequest,
    *,
    workers: int = 16,
    settings: PipelineSettings | None = None,
    on_change: Callable[[HostProgress], None] = lambda progress: None,
    approver: str | None = None,
    dependency_timeout: float = 3600.0,
) -> tuple[str, RunSummary]:
    """Run one wave on a bounded thread pool. Rehearsals are approved automatically (and say so)."""
    hosts = select_hosts(the_plan, request)
    run_id = ledger.start_run(request.mode, request.wave, request.actor)
    ledger.record_approval(
        run_id,
        request.wave,
        hosts,
        approver or "automatic (rehearsal)",
        approval_summary(the_plan, hosts, ledger),
        automatic=approver is None,
    )
    pipeline = HostPipeline(
        ledger, fleet, run_id, request.actor, settings or PipelineSettings(), priority_of(the_plan)
    )
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"wave-{request.wave}") as pool:

        def start(host: Host, done: Callable[[HostOutcome], None]) -> None:
            pool.submit(run_reporting, pipeline, host, done)

        summary = Dispatcher(
            the_plan,
            hosts,
            ledger,
            start,
            max_parallel=workers,
            dependency_timeout=dependency_timeout,
            on_change=on_change,
        ).run()
    ledger.finish_run(run_id, "completed" if summary.ok else "failed")
    return run_id, summary


def run_reporting(pipeline: HostPipeline, host: Host, done: Callable[[HostOutcome], None]) -> HostOutcome:
    """Run one host and always report an outcome, even on a bug: the dispatcher must not wait forever."""
    try:
        outcome = pipeline.run(host)
    except Exception as exc:
        outcome = HostOutcome(
            host.name,
            pipeline.ledger.host(host.name).state,
            f"unexpected error: {exc!r}\n{traceback.format_exc(limit=5)}",
        )
    done(outcome)
    return outcome
