"""The work left in an estate: for each host, its remaining stages and what gates each. Pure.

A host's remaining stages follow from its recorded state (a host that is reimaged has verify and
release left). A dependency gates one stage of its dependent (``Host.gates``): that stage, and every
later one, may start only once the dependency is online.

A procedure step (forest recovery, a credential reset) is a job of one stage, named after the step:
it starts once what it needs is done (hosts online, or a host past a stage: a *milestone*, named
``host@stage``; other steps), no sooner than its waits after other steps, and once approved if it
needs a named approval. What it gates waits for it like for a dependency.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from restore_flows.inventory.estate import GATE_POSITION, Host
from restore_flows.inventory.models import Stage
from restore_flows.inventory.procedures import ProcedureStep, split_milestone
from restore_flows.planning import Plan
from restore_flows.scheduling.durations import PLANNED, Durations, pipeline
from restore_flows.states import (
    FAILED_STAGE,
    FINAL,
    RULE,
    RUNNING_STAGE,
    STEP_STUCK,
    STUCK,
    HostState,
    StepState,
)


class ProcedureStage(StrEnum):
    """The one stage of a procedure step's job."""

    STEP = "step"


Phase = Stage | ProcedureStage
"""What a job's step does: a stage of a host's pipeline, or a procedure step."""


@dataclass(frozen=True, slots=True)
class Step:
    stage: Phase
    minutes: float
    pools: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    """A procedure step starts no sooner than ``minutes`` after ``after`` (another step) was done."""

    after: str
    minutes: float
    reason: str


@dataclass(frozen=True, slots=True)
class Job:
    """One host's remaining work, or a procedure step's."""

    host: str
    wave: int
    """Index of its planned wave."""
    steps: tuple[Step, ...]
    gates: tuple[tuple[str, int], ...]
    """(dependency, index of the first step it gates). A dependency is a host (online), a procedure
    step (done) or a milestone (``host@stage``: that stage of the host done)."""
    waits: tuple[Wait, ...] = ()
    approval: bool = False
    """A procedure step that needs a named approval before it starts."""

    @property
    def minutes(self) -> float:
        return sum(step.minutes for step in self.steps)

    @property
    def is_step(self) -> bool:
        return bool(self.steps) and self.steps[0].stage is ProcedureStage.STEP


def milestone_reached(host: Host, state: HostState, stage: Stage) -> bool:
    """Whether a host in ``state`` is past ``stage`` of its pipeline for good (online counts; a host
    that failed a later stage does too: the stage was done; one on hold or quarantined does not)."""
    stages = pipeline(host)
    if stage not in stages:
        return state is FINAL
    if state is FINAL:
        return True
    left = remaining_stages(host, state, has_evidence=True)
    if left is None:
        failed = FAILED_STAGE.get(state)
        return failed is not None and failed in stages and stages.index(failed) > stages.index(stage)
    return stage not in left


def milestones_of(jobs: Mapping[str, Job], names: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
    """For the milestones among ``names``: host -> (index of the step whose end reaches it, name),
    for the hosts that have a job in which the stage is still to do."""
    found: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        parsed = split_milestone(name)
        if parsed is None:
            continue
        host, stage = parsed
        job = jobs.get(host)
        if job is None:
            continue
        for index, step in enumerate(job.steps):
            if step.stage is stage:
                found.setdefault(host, []).append((index, name))
                break
    return found


def remaining_stages(host: Host, state: HostState, has_evidence: bool = False) -> tuple[Stage, ...] | None:
    """The stages left from ``state``, the running one first; None when only an operator can move it.

    A failed stage at the start of a run is the operator's to retry ('restore decide retry'): the run
    that failed it gave up after its attempts, or it was not worth another attempt.
    """
    if state in STUCK:
        return None
    stages = pipeline(host)
    if state is HostState.COMPROMISED:
        if has_evidence:
            return tuple(s for s in stages if s is not Stage.EVIDENCE)
        return stages
    if state in RUNNING_STAGE:
        return stages[stages.index(RUNNING_STAGE[state]) :] if RUNNING_STAGE[state] in stages else None
    for index, stage in enumerate(stages):
        if RULE[stage].finished is state:
            return stages[index + 1 :]
    return None  # a state this host's pipeline never passes through (e.g. a failed stage of another)


def gate_index(steps: tuple[Step, ...], before: Stage) -> int | None:
    position = GATE_POSITION[before]
    for index, step in enumerate(steps):
        if isinstance(step.stage, Stage) and GATE_POSITION[step.stage] >= position:
            return index
    return None


def job_for(
    host: Host,
    wave: int,
    stages: Iterable[Stage],
    minutes: Callable[[Host, Stage], float],
    steps_gating: Iterable[tuple[str, Stage]] = (),
) -> Job:
    """``steps_gating``: procedure steps that gate the host, with the stage each gates."""
    steps = tuple(Step(stage, minutes(host, stage), tuple(host.pools.get(stage, ()))) for stage in stages)
    gates = []
    for dependency in host.depends_on:
        index = gate_index(steps, host.gate_of(dependency))
        if index is not None:
            gates.append((dependency, index))
    for name, before in steps_gating:
        index = gate_index(steps, before)
        if index is not None:
            gates.append((name, index))
    return Job(host.name, wave, steps, tuple(gates))


def jobs_for(
    the_plan: Plan,
    hosts: Iterable[str],
    states: Mapping[str, HostState] | None = None,
    evidence: Iterable[str] = (),
    durations: Durations = PLANNED,
) -> tuple[dict[str, Job], dict[str, HostState]]:
    """The jobs of ``hosts`` from their states (default: all compromised), and the hosts that are stuck.

    Hosts already online get an empty job (nothing left, already a satisfied dependency).
    """
    estate = the_plan.estate
    wave_index = {wave.name: index for index, wave in enumerate(the_plan.waves)}
    gating = step_gates(estate.procedures.values())
    held = set(evidence)
    jobs: dict[str, Job] = {}
    stuck: dict[str, HostState] = {}
    for name in hosts:
        host = estate.hosts[name]
        state = (states or {}).get(name, HostState.COMPROMISED)
        stages = remaining_stages(host, state, name in held)
        if stages is None:
            stuck[name] = state
            continue
        jobs[name] = job_for(
            host, wave_index[the_plan.hosts[name].wave], stages, durations.minutes, gating.get(name, ())
        )
    return jobs, stuck


def step_job(step: ProcedureStep, wave: int, minutes: float, wait_scale: float = 1.0) -> Job:
    """A procedure step's job: one stage, gated by its needs, held by its waits. ``wait_scale``: a
    time-scaled rehearsal shortens the waits as it shortens the stages (a live run: 1)."""
    return Job(
        step.name,
        wave,
        (Step(ProcedureStage.STEP, minutes, ()),),
        tuple((need.key, 0) for need in step.needs),
        waits=tuple(Wait(w.step, w.minutes * wait_scale, w.reason) for w in step.waits),
        approval=step.approval,
    )


def steps_for(
    the_plan: Plan,
    names: Iterable[str],
    states: Mapping[str, StepState] | None = None,
    durations: Durations = PLANNED,
    wait_scale: float = 1.0,
) -> tuple[dict[str, Job], dict[str, str], set[str]]:
    """The jobs of the procedure steps ``names`` from their states (default: none run yet), the steps
    that wait for an operator (with why), and the steps done."""
    wave_index = {wave.name: index for index, wave in enumerate(the_plan.waves)}
    jobs: dict[str, Job] = {}
    stuck: dict[str, str] = {}
    done: set[str] = set()
    for name in names:
        step = the_plan.estate.procedures[name]
        state = (states or {}).get(name, StepState.PENDING)
        if state is StepState.DONE:
            done.add(name)
        elif state in STEP_STUCK and not step.repeatable:
            stuck[name] = f"is {state.value}: an operator re-arms it"
        else:
            wave = wave_index[the_plan.steps[name].wave]
            jobs[name] = step_job(step, wave, step.minutes * durations.pace, wait_scale)
    return jobs, stuck, done


def milestone_facts(
    the_plan: Plan, jobs: Mapping[str, Job], states: Mapping[str, HostState]
) -> tuple[set[str], dict[str, str]]:
    """The milestones the jobs wait for whose host has no job of its own: those reached already, and
    those that cannot be without an operator (with why)."""
    reached: set[str] = set()
    stuck: dict[str, str] = {}
    for job in jobs.values():
        for dependency, _ in job.gates:
            parsed = split_milestone(dependency)
            if parsed is None or parsed[0] in jobs or dependency in reached or dependency in stuck:
                continue
            name, stage = parsed
            state = states.get(name, HostState.COMPROMISED)
            if milestone_reached(the_plan.estate.hosts[name], state, stage):
                reached.add(dependency)
            elif state in STUCK:
                stuck[dependency] = f"is {state.value}"
    return reached, stuck


def step_gates(steps: Iterable[ProcedureStep]) -> dict[str, list[tuple[str, Stage]]]:
    """Host -> the steps that gate it, with the stage each gates."""
    found: dict[str, list[tuple[str, Stage]]] = {}
    for step in steps:
        for host, stage in step.gated_hosts().items():
            found.setdefault(host, []).append((step.name, stage))
    return found


def work_order(the_plan: Plan) -> list[str]:
    """Every host and procedure step, what it waits for first; among those free to go, the plan's
    order (a step just before the first host it gates)."""
    estate = the_plan.estate
    hosts = [name for wave in the_plan.waves for name in wave.hosts]
    rank: dict[str, float] = {name: float(index) for index, name in enumerate(hosts)}
    after: dict[str, list[str]] = {}
    blocking: dict[str, int] = dict.fromkeys(hosts, 0)
    for name in hosts:
        for dependency in estate.hosts[name].depends_on:
            after.setdefault(dependency, []).append(name)
            blocking[name] += 1
    for step in estate.procedures.values():
        blocking.setdefault(step.name, 0)
        for need in step.needs:
            after.setdefault(need.name, []).append(step.name)
            blocking[step.name] += 1
        gated = step.gated_hosts()
        needed = {need.name for need in step.needs}
        # A step that needs an earlier stage of a host it gates comes after that host in this order.
        for host in gated.keys() - needed:
            after.setdefault(step.name, []).append(host)
            blocking[host] += 1
        rank[step.name] = min((rank[h] for h in gated), default=float(len(hosts))) - 0.5
    heap = [(rank[name], name) for name, count in blocking.items() if count == 0]
    heapq.heapify(heap)
    order: list[str] = []
    while heap:
        _, name = heapq.heappop(heap)
        order.append(name)
        for dependent in after.get(name, ()):
            blocking[dependent] -= 1
            if blocking[dependent] == 0:
                heapq.heappush(heap, (rank[dependent], dependent))
    if len(order) != len(blocking):
        raise ValueError("dependency cycle through procedure steps: validate the inventory first")
    return order
