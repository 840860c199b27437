"""The work left in an estate: for each host, its remaining stages and what gates each. Pure.

A host's remaining stages follow from its recorded state (a host that is reimaged has verify and
release left). A dependency gates one stage of its dependent (``Host.gates``): that stage, and every
later one, may start only once the dependency is online.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from restore_flows.inventory.estate import GATE_POSITION, Host
from restore_flows.inventory.models import Stage
from restore_flows.planning import Plan
from restore_flows.scheduling.durations import PLANNED, Durations, pipeline
from restore_flows.states import RULE, RUNNING_STAGE, STUCK, HostState


@dataclass(frozen=True, slots=True)
class Step:
    stage: Stage
    minutes: float
    pools: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Job:
    """One host's remaining work."""

    host: str
    wave: int
    """Index of its planned wave."""
    steps: tuple[Step, ...]
    gates: tuple[tuple[str, int], ...]
    """(dependency, index of the first step it gates)."""

    @property
    def minutes(self) -> float:
        return sum(step.minutes for step in self.steps)


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
        if GATE_POSITION[step.stage] >= position:
            return index
    return None


def job_for(
    host: Host,
    wave: int,
    stages: Iterable[Stage],
    minutes: Callable[[Host, Stage], float],
) -> Job:
    steps = tuple(Step(stage, minutes(host, stage), tuple(host.pools.get(stage, ()))) for stage in stages)
    gates = []
    for dependency in host.depends_on:
        index = gate_index(steps, host.gate_of(dependency))
        if index is not None:
            gates.append((dependency, index))
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
        jobs[name] = job_for(host, wave_index[the_plan.hosts[name].wave], stages, durations.minutes)
    return jobs, stuck
