"""The estate at a glance, for managers and the crisis cell: per wave (and per site and department in
it) how much is online, the ETA from the forecast, and what holds progress back. The dashboard and the
situation report both draw from this one object, so they never disagree.

    from restore_flows.reporting.overview import overview
    view = overview(ledger, the_plan)              # runs the forecast (about 0.2 s for 1,700 hosts)
    view = overview(ledger, the_plan, found, plan_forecast=planned(the_plan))   # a forecast made already
    view.to_json()                                 # what /api/status.json serves

Every host is counted in exactly one of five progress buckets:

* ``online``: back in service;
* ``failed``: an operator must act (a failed stage, quarantine, on hold: ``states.STUCK``);
* ``blocked``: it cannot finish because something it depends on is stuck (the forecast says so);
* ``in_progress``: partway through its pipeline, or a stage running;
* ``waiting``: nothing done yet.

Reads only: nothing here writes to the ledger or syncs the inventory.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from restore_flows.execution.eta import forecast_from_ledger, learned_durations
from restore_flows.ledger import queries
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.status import bucket, iso
from restore_flows.planning import Plan
from restore_flows.scheduling.durations import Durations
from restore_flows.scheduling.forecast import Forecast, forecast
from restore_flows.scheduling.work import jobs_for
from restore_flows.states import FAILED, FINAL, RUNNING_STAGE, STUCK, HostState

BUCKETS = ("online", "in_progress", "waiting", "failed", "blocked")


@dataclass(frozen=True, slots=True)
class Counts:
    total: int = 0
    online: int = 0
    in_progress: int = 0
    waiting: int = 0
    failed: int = 0
    blocked: int = 0

    @property
    def percent(self) -> float:
        return round(100.0 * self.online / self.total, 1) if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "online": self.online,
            "in_progress": self.in_progress,
            "waiting": self.waiting,
            "failed": self.failed,
            "blocked": self.blocked,
            "percent": self.percent,
        }


def _count(buckets: Iterable[str]) -> Counts:
    tally = dict.fromkeys(BUCKETS, 0)
    for name in buckets:
        tally[name] += 1
    return Counts(total=sum(tally.values()), **tally)


class Hold(StrEnum):
    """Why progress is held back at one host."""

    FAILED = "failed"
    """A stage failed, or an IOC quarantined it: an operator decides (retry, skip, recompromise)."""
    ON_HOLD = "on_hold"
    """An operator set it aside; nothing happens to it until released."""
    INTERRUPTED = "interrupted"
    """A run that is gone left a stage running on it: a resumed run or an operator resolves it."""
    EVIDENCE = "evidence"
    """Under forensic hold with no evidence registered: it is not wiped until the forensic team acts."""
    DEPENDENCY = "dependency"
    """Not online yet, and other hosts wait at a stage it gates: normal progress, shown so people know
    which host the rest are waiting for."""


NEEDS_PEOPLE = frozenset({Hold.FAILED, Hold.ON_HOLD, Hold.INTERRUPTED, Hold.EVIDENCE})


@dataclass(frozen=True, slots=True)
class Blocker:
    """One host that holds others (or itself) back, and why, in words for people."""

    hold: Hold
    host: str
    state: HostState
    wave: str
    site: str
    department: str
    reason: str
    """The last error, the operator's reason or what the host waits for."""
    since: dt.datetime | None
    """When the ledger last recorded a change of this host."""
    actor: str | None
    """Who recorded it (a run's actor, an operator, the forensic custodian)."""
    holds_back: tuple[str, ...]
    """Hosts that cannot finish because of it (blocked, transitively), or that wait at a gate on it."""
    eta_minutes: float | None = None
    """For a dependency: minutes until the forecast has it online."""

    @property
    def needs_people(self) -> bool:
        return self.hold in NEEDS_PEOPLE

    def to_json(self, names: int = 20) -> dict[str, Any]:
        return {
            "hold": self.hold.value,
            "needs_people": self.needs_people,
            "host": self.host,
            "state": self.state.value,
            "wave": self.wave,
            "site": self.site,
            "department": self.department,
            "reason": self.reason,
            "since": iso(self.since),
            "actor": self.actor,
            "holds_back": len(self.holds_back),
            "holds_back_hosts": list(self.holds_back[:names]),
            "eta_minutes": _round(self.eta_minutes),
        }


@dataclass(frozen=True, slots=True)
class WaveView:
    name: str
    counts: Counts
    sites: Mapping[str, Counts]
    departments: Mapping[str, Counts]
    eta_minutes: float | None
    """Minutes from the overview's time until its last host is online; None: not without an operator."""
    eta_others_minutes: float | None
    """When the forecast has every host of it that can come back online without an operator."""
    eta_start_minutes: float | None
    """When the forecast starts its next stage, minutes from now (None if nothing is left to start)."""
    bound_minutes: float | None
    """No schedule can bring it back sooner (the longest chain; each pool's work over its capacity)."""
    planned_start_minutes: float | None
    """The plan, from the ledger's first stage: when its first stage was to start."""
    planned_finish_minutes: float | None
    """The plan, from the ledger's first stage: when it was to be all back."""
    first_started: dt.datetime | None
    last_ended: dt.datetime | None
    online_times: tuple[dt.datetime, ...]
    """When each of its hosts that is online now came online, in order."""
    will_not_finish: Mapping[str, str]
    """Hosts the forecast does not bring back, with why."""

    @property
    def done(self) -> bool:
        return self.counts.total > 0 and self.counts.online == self.counts.total

    @property
    def finished_at(self) -> dt.datetime | None:
        """When its last host came online, once all are."""
        return self.online_times[-1] if self.done and self.online_times else None

    def online_at(self, share: float) -> dt.datetime | None:
        """When ``share`` (0-1] of its hosts were online, if that many are."""
        needed = max(1, math.ceil(share * self.counts.total - 1e-9))
        return self.online_times[needed - 1] if len(self.online_times) >= needed else None

    def to_json(self, at: dt.datetime, started: dt.datetime | None) -> dict[str, Any]:
        origin = started or at
        return {
            "name": self.name,
            **self.counts.to_json(),
            "sites": {name: c.to_json() for name, c in self.sites.items()},
            "departments": {name: c.to_json() for name, c in self.departments.items()},
            "eta_minutes": _round(self.eta_minutes),
            "eta_at": iso(_plus(at, self.eta_minutes)),
            "eta_others_at": iso(_plus(at, self.eta_others_minutes)),
            "eta_start_at": iso(_plus(at, self.eta_start_minutes)),
            "bound_minutes": _round(self.bound_minutes),
            "planned_start_at": iso(_plus(origin, self.planned_start_minutes)),
            "planned_finish_at": iso(_plus(origin, self.planned_finish_minutes)),
            "first_started_at": iso(self.first_started),
            "last_ended_at": iso(self.last_ended),
            "first_online_at": iso(self.online_times[0] if self.online_times else None),
            "finished_at": iso(self.finished_at),
            "will_not_finish": len(self.will_not_finish),
        }


@dataclass(frozen=True)
class Overview:
    at: dt.datetime
    """When it was read: ETAs count from here."""
    started: dt.datetime | None
    """When the first stage in the ledger started (the plan counts from here)."""
    estate: Counts
    eta_minutes: float | None
    """Until every host is online; None if some will not be without an operator."""
    waves: tuple[WaveView, ...]
    sites: Mapping[str, Mapping[str, Counts]]
    """Site -> department -> counts, over every wave."""
    blockers: tuple[Blocker, ...]
    """What needs people first (clinical priority, then most hosts held back), then the dependencies
    others wait for."""

    def wave(self, name: str) -> WaveView:
        for wave in self.waves:
            if wave.name == name:
                return wave
        raise KeyError(name)

    @property
    def done(self) -> bool:
        return self.estate.total > 0 and self.estate.online == self.estate.total

    def to_json(self, blockers: int = 100) -> dict[str, Any]:
        """``blockers``: at most this many of each kind (people, dependencies); the counts say how many."""
        people = [b for b in self.blockers if b.needs_people]
        dependencies = [b for b in self.blockers if not b.needs_people]
        return {
            "at": iso(self.at),
            "started_at": iso(self.started),
            "done": self.done,
            "estate": {
                **self.estate.to_json(),
                "eta_minutes": _round(self.eta_minutes),
                "eta_at": iso(_plus(self.at, self.eta_minutes)),
            },
            "waves": [wave.to_json(self.at, self.started) for wave in self.waves],
            "sites": {
                site: {department: c.to_json() for department, c in departments.items()}
                for site, departments in self.sites.items()
            },
            "needs_people": [b.to_json() for b in people[:blockers]],
            "needs_people_total": len(people),
            "waiting_for": [b.to_json() for b in dependencies[:blockers]],
            "waiting_for_total": len(dependencies),
        }


def plan_pace(ledger: Ledger, the_plan: Plan, rehearsal: bool) -> float:
    """The pace to draw the plan at: the plan's own for live work; for a rehearsal, whose time scale
    only the run knows, the pace observed in its ledger (1.0 until a stage has finished)."""
    if not rehearsal:
        return 1.0
    pace = learned_durations(ledger, the_plan).pace
    # Two significant digits: the plan is forecast again only when the pace really changed.
    return float(f"{pace:.2g}") if pace > 0 else 1.0


def planned(the_plan: Plan, pace: float = 1.0) -> Forecast:
    """The plan: the forecast of the whole restore as if nothing were done, at ``pace`` times the
    planned durations (a rehearsal's time scale). It depends on the plan alone: compute it once."""
    return forecast(the_plan, durations=Durations(pace=pace))


def overview(
    ledger: Ledger,
    the_plan: Plan,
    found: Forecast | None = None,
    *,
    plan_forecast: Forecast | None = None,
    now: Callable[[], dt.datetime] | None = None,
    default_pace: float = 1.0,
) -> Overview:
    """The estate from the ledger's states, laid out by the plan's waves.

    ``found``: the forecast from the ledger (default: run now, at the ledger's clock). ``plan_forecast``:
    :func:`planned`, for the plan-versus-done timeline (default: none drawn).
    """
    clock = now or ledger.now
    at = clock()
    found = found or forecast_from_ledger(ledger, the_plan, now=lambda: at, default_pace=default_pace)
    hosts = the_plan.estate.hosts
    recorded = ledger.states()
    # A host the inventory has and the ledger does not yet (not synced) is where every host starts.
    states = {name: recorded.get(name, HostState.COMPROMISED) for name in hosts}
    online = {name for name, state in states.items() if state is FINAL}
    stuck = {name for name, state in states.items() if state in STUCK}
    blocked = {n for n in found.unfinished if n in hosts and n not in stuck and n not in online}
    progress = {name: _bucket(state, name in blocked) for name, state in states.items()}

    started, came_online = ledger.back_online()
    times = queries.wave_stage_times(ledger)
    waves = []
    for planned_wave in the_plan.waves:
        members = list(planned_wave.hosts)
        wave_forecast = found.waves.get(planned_wave.name)
        plan_wave = plan_forecast.waves.get(planned_wave.name) if plan_forecast else None
        inside = set(members)
        starts = [m for (name, _stage), m in found.starts.items() if name in inside]
        plan_starts = (
            [m for (name, _stage), m in plan_forecast.starts.items() if name in inside]
            if plan_forecast
            else []
        )
        wave_times = times.get(planned_wave.name)
        waves.append(
            WaveView(
                name=planned_wave.name,
                counts=_count(progress[n] for n in members),
                sites=_by(members, progress, lambda n: hosts[n].site),
                departments=_by(members, progress, lambda n: hosts[n].department),
                eta_minutes=wave_forecast.finish_minutes if wave_forecast else None,
                eta_others_minutes=max(
                    (found.finish.get(n, 0.0) for n in members if n not in online and n in found.finish),
                    default=0.0,
                ),
                eta_start_minutes=min(starts) if starts else None,
                bound_minutes=wave_forecast.bound.minutes if wave_forecast else None,
                planned_start_minutes=min(plan_starts) if plan_starts else None,
                planned_finish_minutes=plan_wave.finish_minutes if plan_wave else None,
                first_started=wave_times.first_started if wave_times else None,
                last_ended=wave_times.last_ended if wave_times else None,
                online_times=tuple(sorted(came_online[n] for n in inside & online if n in came_online)),
                will_not_finish=dict(wave_forecast.unfinished) if wave_forecast else {},
            )
        )
    sites: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, host in hosts.items():
        sites[host.site][host.department].append(progress[name])
    return Overview(
        at=at,
        started=started,
        estate=_count(progress.values()),
        eta_minutes=found.makespan_minutes,
        waves=tuple(waves),
        sites={
            site: {department: _count(sites[site][department]) for department in sorted(sites[site])}
            for site in sorted(sites)
        },
        blockers=tuple(_blockers(ledger, the_plan, found, states, blocked)),
    )


def _bucket(state: HostState, blocked: bool) -> str:
    coarse = bucket(state)
    if coarse in ("online", "failed"):
        return coarse
    return "blocked" if blocked else coarse


def _by(members: Sequence[str], progress: Mapping[str, str], key: Callable[[str], str]) -> dict[str, Counts]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name in members:
        groups[key(name)].append(progress[name])
    return {group: _count(groups[group]) for group in sorted(groups)}


def _blockers(
    ledger: Ledger,
    the_plan: Plan,
    found: Forecast,
    states: Mapping[str, HostState],
    blocked: set[str],
) -> list[Blocker]:
    hosts = the_plan.estate.hosts
    wave_index = {wave.name: index for index, wave in enumerate(the_plan.waves)}
    dependents: dict[str, list[str]] = defaultdict(list)
    for name, host in hosts.items():
        for dependency in host.depends_on:
            dependents[dependency].append(name)

    def held_back(root: str, hold: Hold) -> tuple[str, ...]:
        """Hosts not online that depend on ``root``, directly or through other hosts: of a stuck host,
        those the forecast says cannot finish (a dependent past the stage it gates can)."""
        seen: set[str] = set()
        todo = list(dependents.get(root, ()))
        while todo:
            name = todo.pop()
            if name in seen or states[name] is FINAL:
                continue
            seen.add(name)
            todo.extend(dependents.get(name, ()))
        if hold in (Hold.FAILED, Hold.ON_HOLD):
            seen &= blocked
        return tuple(sorted(seen, key=lambda n: (wave_index[the_plan.hosts[n].wave], n)))

    evidence = ledger.with_evidence()
    interrupted = dict(ledger.interrupted())
    held = {
        name: hold
        for name, state in states.items()
        for hold in [_hold(state, name in interrupted, hosts[name].forensic_hold and name not in evidence)]
        if hold is not None
    }
    last = queries.last_transitions(ledger, held)
    people = []
    for name, hold in held.items():
        host = hosts[name]
        change = last.get(name)
        if hold is Hold.INTERRUPTED:
            reason = f"{interrupted[name]} was left running by a run that is gone"
        elif hold is Hold.EVIDENCE:
            reason = "under forensic hold: waiting for the forensic team to register evidence"
        else:
            reason = (change.detail if change is not None else None) or f"is {states[name].value}"
        people.append(
            Blocker(
                hold=hold,
                host=name,
                state=states[name],
                wave=the_plan.hosts[name].wave,
                site=host.site,
                department=host.department,
                reason=reason,
                since=change.at if change is not None else None,
                actor=change.actor if change is not None else None,
                holds_back=held_back(name, hold),
            )
        )

    # Clinical priority first: what holds back the earliest wave (its own or a dependent's), then
    # whatever holds back the most hosts.
    def urgency(b: Blocker) -> tuple[int, int, str]:
        earliest = min([wave_index[b.wave], *(wave_index[the_plan.hosts[n].wave] for n in b.holds_back)])
        return (earliest, -len(b.holds_back), b.host)

    people.sort(key=urgency)
    return people + _waited_for(the_plan, found, states, evidence, blocked, held, wave_index)


def _hold(state: HostState, interrupted: bool, no_evidence: bool) -> Hold | None:
    if state is HostState.ON_HOLD:
        return Hold.ON_HOLD
    if state in FAILED or state is HostState.QUARANTINED:
        return Hold.FAILED
    if interrupted:
        return Hold.INTERRUPTED
    if no_evidence and state is HostState.COMPROMISED:
        return Hold.EVIDENCE
    return None


def _waited_for(
    the_plan: Plan,
    found: Forecast,
    states: Mapping[str, HostState],
    evidence: set[str],
    blocked: set[str],
    held: Mapping[str, Hold],
    wave_index: Mapping[str, int],
) -> list[Blocker]:
    """Hosts not online that others wait for right now: their next stage is gated on them."""
    hosts = the_plan.estate.hosts
    candidates = [
        name
        for name, state in states.items()
        if state is not FINAL and state not in STUCK and state not in RUNNING_STAGE and name not in blocked
    ]
    jobs, _stuck = jobs_for(the_plan, candidates, states, evidence)
    waiting: dict[str, list[str]] = defaultdict(list)
    for name, job in jobs.items():
        for dependency, index in job.gates:
            if index == 0 and states.get(dependency) is not FINAL and dependency not in held:
                waiting[dependency].append(name)
    out = []
    for dependency, names in waiting.items():
        host = hosts[dependency]
        state = states[dependency]
        doing = RUNNING_STAGE.get(state)
        out.append(
            Blocker(
                hold=Hold.DEPENDENCY,
                host=dependency,
                state=state,
                wave=the_plan.hosts[dependency].wave,
                site=host.site,
                department=host.department,
                reason=f"{doing.value} running" if doing else f"is {state.value}",
                since=None,
                actor=None,
                holds_back=tuple(sorted(names, key=lambda n: (wave_index[the_plan.hosts[n].wave], n))),
                eta_minutes=found.finish.get(dependency),
            )
        )
    out.sort(key=lambda b: (-len(b.holds_back), wave_index[b.wave], b.host))
    return out


def _plus(at: dt.datetime, minutes: float | None) -> dt.datetime | None:
    return None if minutes is None else at + dt.timedelta(minutes=minutes)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
