"""The forecast: the scheduler run on a virtual clock. No sleeping, no Prefect, no machines.

It starts from where the estate is (the ledger's states, the stages running and for how long, what
was observed of each role's stages) or, ``fresh``, from nothing restored, and plays the rest through
the same scheduler and loop as a real run. That makes it the ETA everywhere (status, artifacts, the
terminal) and the what-if tool: more capacity in a pool, SRM-style barrier waves, some waves only.
A forecast is never below its lower bound (:mod:`restore_flows.scheduling.bounds`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from restore_flows.inventory.models import Stage
from restore_flows.planning import Plan
from restore_flows.scheduling.bounds import Bound, bound
from restore_flows.scheduling.clock import Outcome, Result, VirtualClock
from restore_flows.scheduling.durations import PLANNED, Durations, draw
from restore_flows.scheduling.priority import Priorities, PriorityPolicy
from restore_flows.scheduling.runner import StaticWorld, run
from restore_flows.scheduling.scheduler import BARRIER, CAMPAIGN, Policy, Scheduler, Start, Status
from restore_flows.scheduling.work import (
    Job,
    Phase,
    ProcedureStage,
    jobs_for,
    milestone_facts,
    steps_for,
    work_order,
)
from restore_flows.states import HostState, StepState

POLICIES: Mapping[str, tuple[Policy, PriorityPolicy]] = {
    # Every wave at once, the stage needed soonest first.
    "campaign": (CAMPAIGN, PriorityPolicy.LOOKAHEAD),
    # SRM-style: a wave starts when the previous one is done, its hosts in the plan's order, as many
    # at once as the pools allow (no slot cap: SRM powers on as many VMs as it can).
    "barrier": (BARRIER, PriorityPolicy.PLAN),
}


@dataclass(frozen=True)
class WhatIf:
    """Options of a forecast; the defaults forecast the real thing."""

    policy: str = "campaign"
    capacity: Mapping[str, int] = field(default_factory=dict)
    """Pool capacities to use instead of the inventory's."""
    waves: tuple[str, ...] = ()
    """Only these waves' hosts (as 'restore rehearse --wave' runs them); default: every wave."""
    priority: PriorityPolicy | None = None
    """Default: the policy's own (look-ahead for the campaign, the plan's order for barrier waves)."""
    max_hosts: int | None = None
    """At most this many hosts in flight, each from first stage to last (how the restore used to run)."""
    gate_everything_before: Stage | None = None
    """Every dependency gates this stage instead of what the inventory says (for comparison)."""
    noise: float = 0.0
    """Each stage takes its minutes times a factor drawn in [1 - noise, 1 + noise]."""
    fail_rate: float = 0.0
    """Share of stage attempts that fail (and are retried like in a real run)."""
    seed: int = 0


@dataclass(frozen=True)
class WaveForecast:
    name: str
    hosts: int
    online: int
    """Already online when the forecast started."""
    finish_minutes: float | None
    """When its last host is online; None if some of them will not come online."""
    bound: Bound
    unfinished: Mapping[str, str]
    """Hosts that will not come online, with why."""


@dataclass(frozen=True)
class Forecast:
    policy: str
    makespan_minutes: float | None
    bound: Bound
    waves: Mapping[str, WaveForecast]
    finish: Mapping[str, float]
    """When each host comes online (each procedure step is done), minutes from now."""
    starts: Mapping[tuple[str, Phase], float]
    """When each host's stage (last attempt) starts, minutes from now."""
    unfinished: Mapping[str, str]
    steps: tuple[str, ...] = ()
    """The procedure steps forecast (their times are in ``starts`` and ``finish``)."""

    def step_times(self, name: str) -> tuple[float | None, float | None]:
        """(start, finish) of a procedure step, minutes from now; None: not in this forecast's future."""
        return self.starts.get((name, ProcedureStage.STEP)), self.finish.get(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "makespan_minutes": _round(self.makespan_minutes),
            "bound_minutes": _round(self.bound.minutes),
            "bound_because": self.bound.because,
            "waves": {
                name: {
                    "finish_minutes": _round(wave.finish_minutes),
                    "bound_minutes": _round(wave.bound.minutes),
                    "hosts": wave.hosts,
                    "online_now": wave.online,
                    "will_not_finish": dict(sorted(wave.unfinished.items())[:20]),
                }
                for name, wave in self.waves.items()
            },
            "procedures": {
                name: {
                    "start_minutes": _round(start),
                    "finish_minutes": _round(finish),
                    **({"will_not_finish": self.unfinished[name]} if name in self.unfinished else {}),
                }
                for name in self.steps
                for start, finish in (self.step_times(name),)
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class VirtualStarter:
    """Stages take their minutes (with seeded noise) on the virtual clock and fail at a seeded rate."""

    def __init__(
        self,
        clock: VirtualClock,
        *,
        noise: float = 0.0,
        fail_rate: float = 0.0,
        seed: int = 0,
        remaining: Mapping[str, float] | None = None,
    ) -> None:
        self._clock = clock
        self._noise = noise
        self._fail_rate = fail_rate
        self._seed = seed
        self._remaining = dict(remaining or {})
        self._attempts: dict[tuple[str, int], int] = {}

    def start(self, start: Start) -> None:
        attempt = self._attempts.get((start.host, start.step), 0) + 1
        self._attempts[(start.host, start.step)] = attempt
        minutes = self._remaining.pop(start.host, start.minutes)
        key = (self._seed, start.host, start.stage.value, attempt)
        if self._noise:
            minutes *= 1.0 + self._noise * (2.0 * draw(*key, "noise") - 1.0)
        if self._fail_rate and draw(*key, "fail") < self._fail_rate:
            outcome = Outcome(start.host, Result.FAILED, retryable=True, error="simulated failure")
        else:
            outcome = Outcome(start.host, Result.DONE, start.step + 1, attempt=attempt)
        self._clock.after(minutes, outcome)


class Timeline:
    """Records when each stage started and each host came online (the forecast's answer)."""

    def __init__(self, jobs: Mapping[str, Job]) -> None:
        self.starts: dict[tuple[str, Phase], float] = {}
        self.finish: dict[str, float] = {}
        self._steps = {name: len(job.steps) for name, job in jobs.items()}

    def started(self, start: Start, now: float) -> None:
        self.starts[(start.host, start.stage)] = now

    def ended(self, start: Start, outcome: Outcome, now: float) -> None:
        done = outcome.result is Result.DONE and outcome.next_step is not None
        if done and outcome.next_step is not None and outcome.next_step >= self._steps[start.host]:
            self.finish[start.host] = now


def forecast(
    the_plan: Plan,
    *,
    what_if: WhatIf | None = None,
    states: Mapping[str, HostState] | None = None,
    evidence: Iterable[str] = (),
    durations: Durations = PLANNED,
    running: Mapping[str, float] | None = None,
    approved: Iterable[str] | None = None,
    step_states: Mapping[str, StepState] | None = None,
    done_at: Mapping[str, float] | None = None,
    wait_scale: float = 1.0,
) -> Forecast:
    """Forecast the restore of ``the_plan`` from ``states`` (default: nothing restored).

    ``running``: hosts (and steps) whose current stage is running, with the minutes it has run.
    ``approved``: waves approved (default: all; a forecast of waves still waiting assumes they are
    approved now, and steps that need a named approval get it when due). ``step_states``: of the
    procedure steps (default: none run); ``done_at``: when steps done were done (minutes from now,
    negative): their waits count from there. ``wait_scale``: a time-scaled rehearsal's scale.
    """
    options = what_if or WhatIf()
    if options.policy not in POLICIES:
        raise ValueError(f"unknown policy {options.policy!r} (policies: {', '.join(POLICIES)})")
    base, usual_priority = POLICIES[options.policy]
    chosen = options.waves or tuple(w.name for w in the_plan.waves)
    unknown = set(chosen) - {w.name for w in the_plan.waves}
    if unknown:
        raise ValueError(f"no such wave: {', '.join(sorted(unknown))}")
    every = [name for wave in the_plan.waves for name in wave.hosts]
    members = [name for wave in the_plan.waves if wave.name in chosen for name in wave.hosts]
    states = dict(states or {})
    gated = the_plan
    if options.gate_everything_before is not None:
        gated = _gated_everything(the_plan, options.gate_everything_before)
    all_jobs, stuck_states = jobs_for(gated, every, states, evidence, durations)
    jobs = {name: all_jobs[name] for name in members if name in all_jobs}
    chosen_steps = [n for n, planned in the_plan.steps.items() if planned.wave in chosen]
    step_jobs, stuck_steps, done_steps = steps_for(
        the_plan, the_plan.steps, step_states, durations, wait_scale
    )
    all_jobs.update(step_jobs)
    jobs.update({name: step_jobs[name] for name in chosen_steps if name in step_jobs})
    online = {name for name, state in states.items() if state is HostState.ONLINE}
    online |= {name for name, job in all_jobs.items() if not job.steps}
    online |= done_steps
    reached, unreachable = milestone_facts(the_plan, jobs, states)
    online |= reached
    capacities = {name: pool.capacity for name, pool in the_plan.estate.pools.items()}
    capacities.update(options.capacity)
    # Outside the chosen waves only what is online counts: a '--wave' forecast, like a '--wave'
    # rehearsal, waits for nothing else.
    stuck = {name: f"is {state.value}" for name, state in stuck_states.items()}
    stuck.update(stuck_steps)
    stuck.update(unreachable)
    stuck.update(
        {
            n: "is not in the waves forecast"
            for n in [*every, *the_plan.steps]
            if n not in jobs and n not in online and n not in stuck
        }
    )
    wave_index = {wave.name: index for index, wave in enumerate(the_plan.waves)}
    scheduler = Scheduler(
        jobs,
        Priorities(
            the_plan,
            all_jobs,
            options.priority or usual_priority,
            capacities=capacities,
            online=online,
            done_at=done_at,
        ),
        capacities,
        online=online,
        approved=None if approved is None else {wave_index[w] for w in approved if w in wave_index},
        policy=replace(base, max_hosts=options.max_hosts),
        stuck=stuck,
        steps=the_plan.steps,
        done_at=done_at,
    )
    timeline = _play(scheduler, jobs, options, running or {})
    left = {name: scheduler.why(name) for name in scheduler.unfinished()}
    left.update(
        {
            n: scheduler.dead.get(n, "")
            for n, s in scheduler.status.items()
            if s in (Status.FAILED, Status.BLOCKED)
        }
    )
    left.update({n: f"is {s.value}" for n, s in stuck_states.items() if n in members})
    left.update({n: why for n, why in stuck_steps.items() if n in chosen_steps})
    order = work_order(the_plan)
    waves = {
        wave.name: _wave(
            wave.name, list(wave.hosts), jobs, timeline, left, online, states, order, capacities, done_at
        )
        for wave in the_plan.waves
        if wave.name in chosen
    }
    makespan = None if left else max((timeline.finish.get(n, 0.0) for n in jobs), default=0.0)
    return Forecast(
        options.policy,
        makespan,
        bound(jobs, order, capacities, online, done_at=done_at),
        waves,
        timeline.finish,
        timeline.starts,
        left,
        tuple(chosen_steps),
    )


def _play(
    scheduler: Scheduler, jobs: Mapping[str, Job], options: WhatIf, running: Mapping[str, float]
) -> Timeline:
    """The run itself, on the virtual clock."""
    clock = VirtualClock()
    remaining = {
        name: max(0.0, jobs[name].steps[0].minutes - elapsed)
        for name, elapsed in running.items()
        if name in jobs and jobs[name].steps and scheduler.status[name] is not Status.DONE
    }
    starter = VirtualStarter(
        clock, noise=options.noise, fail_rate=options.fail_rate, seed=options.seed, remaining=remaining
    )
    timeline = Timeline(jobs)
    already = [scheduler.already_running(name) for name in remaining]
    for start in already:
        timeline.started(start, 0.0)
        starter.start(start)
    run(scheduler, clock, starter, StaticWorld(), observer=timeline, running=already)
    return timeline


def _wave(
    name: str,
    hosts: list[str],
    jobs: Mapping[str, Job],
    timeline: Timeline,
    left: Mapping[str, str],
    online: set[str],
    states: Mapping[str, HostState],
    order: list[str],
    capacities: Mapping[str, int],
    done_at: Mapping[str, float] | None,
) -> WaveForecast:
    unfinished = {n: left[n] for n in hosts if n in left}
    finish = None if unfinished else max((timeline.finish.get(n, 0.0) for n in hosts), default=0.0)
    return WaveForecast(
        name,
        len(hosts),
        sum(1 for n in hosts if states.get(n) is HostState.ONLINE),
        finish,
        bound(jobs, order, capacities, online, hosts=[n for n in hosts if n in jobs], done_at=done_at),
        unfinished,
    )


def _gated_everything(the_plan: Plan, before: Stage) -> Plan:
    hosts = {
        name: replace(host, gates=dict.fromkeys(host.depends_on, before))
        for name, host in the_plan.estate.hosts.items()
    }
    return replace(the_plan, estate=replace(the_plan.estate, hosts=hosts))
