"""The ETA: the forecast run from where the ledger says the estate is, at the pace seen so far.

This is the one estimate shown everywhere (``restore status``, ``restore forecast``, the run's
artifacts, the terminal): the scheduler of the real run, on a virtual clock, from the hosts' recorded
states, the stages running and for how long, and the median duration observed per role and stage.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from restore_flows.inventory.models import Stage
from restore_flows.ledger.records import HostRecord
from restore_flows.ledger.repository import Ledger, utcnow
from restore_flows.ledger.status import status_report
from restore_flows.planning import Plan
from restore_flows.scheduling.durations import Durations, Observation
from restore_flows.scheduling.forecast import Forecast, WhatIf, forecast
from restore_flows.states import RUNNING_STAGE, HostState, StepState


def learned_durations(ledger: Ledger, the_plan: Plan, default_pace: float = 1.0) -> Durations:
    observations = (
        Observation(host, Stage(stage), seconds) for host, stage, seconds in ledger.finished_attempts()
    )
    return Durations.learned(the_plan.estate.hosts, observations, default_pace=default_pace)


def forecast_from_ledger(
    ledger: Ledger,
    the_plan: Plan,
    what_if: WhatIf | None = None,
    *,
    now: Callable[[], dt.datetime] = utcnow,
    default_pace: float = 1.0,
) -> Forecast:
    """Minutes from now. ``default_pace`` scales the plan while nothing was observed (a rehearsal's
    time scale); ``forecast(the_plan)`` alone is the fresh forecast, as if nothing were restored."""
    states = ledger.states()
    running: dict[str, float] = {}
    at = now()
    leases = ledger.leases()
    for host, (stage, _run, started) in ledger.running_stages().items():
        state = states.get(host)
        lease = leases.get(host)
        # A stage left running by a run that is gone will be started again: it is not half done.
        alive = lease is not None and lease[1] is not None and lease[1] > at
        if alive and state is not None and RUNNING_STAGE.get(state) is Stage(stage):
            running[host] = max(0.0, (at - started).total_seconds() / 60.0)
    records = ledger.steps.states() if the_plan.steps else {}
    done_at = {
        name: -(at - as_utc(record.finished_at)).total_seconds() / 60.0
        for name, record in records.items()
        if record.state is StepState.DONE and record.finished_at is not None
    }
    return forecast(
        the_plan,
        what_if=what_if,
        states=states,
        evidence=ledger.with_evidence(),
        durations=learned_durations(ledger, the_plan, default_pace),
        running=running,
        step_states={name: record.state for name, record in records.items()},
        done_at=done_at,
        # A rehearsal's waits shrink with its stages, as its runs do (a live run's pace is 1).
        wait_scale=default_pace,
    )


def as_utc(value: dt.datetime) -> dt.datetime:
    # SQLite gives naive datetimes back; the ledger stamps everything in UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def format_minutes(minutes: float | None) -> str:
    """For people: '45 s', '12 min', '9.8 h'; None is 'not before an operator acts'."""
    if minutes is None:
        return "not until an operator acts"
    seconds = minutes * 60
    if seconds < 90:
        return f"{seconds:.0f} s"
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def estate_status(ledger: Ledger, the_plan: Plan) -> dict[str, Any]:
    """``restore status --json``: the inventory's hosts as the ledger knows them, per wave, site,
    department and kind, with each wave's ETA from the forecast. Reads only: a host no run has
    enrolled yet counts as compromised (``not_enrolled``); ledger hosts of another inventory are
    counted, not shown (``not_in_inventory``)."""
    hosts = the_plan.estate.hosts
    known = {record.name: record for record in ledger.hosts()}
    records = [known[name] for name in hosts if name in known]
    missing = [name for name in hosts if name not in known]
    records += [_unenrolled(the_plan, name) for name in missing]
    found = forecast_from_ledger(ledger, the_plan)
    etas = {name: wave.finish_minutes for name, wave in found.waves.items()}
    report = status_report(records, [w.name for w in the_plan.waves], etas)
    report["estate"]["eta_minutes"] = found.makespan_minutes
    report["not_enrolled"] = len(missing)
    report["not_in_inventory"] = sum(1 for name in known if name not in hosts)
    return report


def _unenrolled(the_plan: Plan, name: str) -> HostRecord:
    host = the_plan.estate.hosts[name]
    return HostRecord(
        name=name,
        site=host.site,
        kind=host.kind.value,
        role=host.role,
        department=host.department,
        wave=the_plan.hosts[name].wave,
        restore_method=host.restore_method.value,
        forensic_hold=host.forensic_hold,
        state=HostState.COMPROMISED,
        clean=False,
        retired=False,
        lease_run=None,
        lease_expires=None,
    )
