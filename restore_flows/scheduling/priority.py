"""Who goes first when stages compete for a pool: the stage whose host is needed soonest. Pure.

"Needed soonest" is measured in time, as a latest start. Each wave after the first is **due** at its
own lower bound (:mod:`restore_flows.scheduling.bounds`: the soonest it could possibly be back, with
every pool to itself), stretched by ``STRETCH`` per place in the clinical order so that intensive care
keeps its lead over the lab, the lab over radiology. A stage's **latest start** is, over every wave
that waits for it (its own host's wave, the waves of the hosts that depend on it, transitively), that
wave's due time minus the longest chain of work from the start of the stage to the end of that wave's
hosts. A free slot goes to the smallest latest start, then:

1. **the earliest wave that needs the host**: its own wave, or that of the earliest host that depends
   on it (transitively). A host of the first wave (core) that others depend on ranks with them alone:
   a domain controller that intensive care needs ranks with intensive care, one that only the offices
   need waits with the offices. A first-wave host nothing depends on keeps the last wave's rank;
2. the plan's order.

Why not the earliest wave first, always: a wave bound by a shared pool (the lab's restores from the
backup platform) holds the pool's slots while a wave with a long chain behind a few of its restores
(radiology's RIS, then PACS, then the PACS caches, then the workstations) could have had them at no
cost to the first. The latest start sees that; a plain wave rank does not. A stage nothing in a later
wave waits for (a procedure step that gates nothing) counts against the due time of the earliest wave
that needs it, with the longest chain of work behind it.

The ``plan`` policy ranks by the plan's order alone (earlier wave, then start order), as the restore
did before it looked ahead; kept for comparison in what-if forecasts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from restore_flows.inventory.procedures import split_milestone
from restore_flows.planning import Plan
from restore_flows.scheduling.bounds import bound
from restore_flows.scheduling.work import Job, work_order

Key = tuple[float, int, int]
"""(latest start, rank of the earliest wave that needs the host, plan order); smaller goes first."""

STRETCH = 0.05
"""How much later, relative to its own bound, each wave is due per place in the clinical order. Large
enough that intensive care keeps its lead, small enough that the lab does not starve radiology.
Measured by ``benchmarks/schedule.py``: 0.03 to 0.10 give the same schedules on the sample and on
its variants with fewer or more backup streams; 0 lets radiology's chain overtake intensive care,
0.15 and more is the plain wave rank again."""


class PriorityPolicy(StrEnum):
    LOOKAHEAD = "lookahead"
    PLAN = "plan"


@dataclass
class _Waiting:
    """Who waits for what, among the jobs: on a name (online, done), on a milestone of it, after it."""

    on: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    milestones: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    held: dict[str, list[tuple[str, float]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, jobs: Mapping[str, Job]) -> _Waiting:
        found = cls()
        for other, gated in jobs.items():
            for dependency, index in gated.gates:
                found.on[dependency].append((other, index))
                parsed = split_milestone(dependency)
                if parsed is not None and dependency not in found.milestones[parsed[0]]:
                    found.milestones[parsed[0]].append(dependency)
            for wait in gated.waits:
                found.held[wait.after].append((other, wait.minutes))
        return found


def _tails(
    order: Iterable[str], jobs: Mapping[str, Job], waiting: _Waiting, wave: int | None = None
) -> dict[str, tuple[float, ...]]:
    """For each job, the longest chain of work from the start of each of its stages (and, last, from
    its end) to the end of the work of ``wave``'s hosts (None: of every job); a job that no host of
    the wave waits for, and that is not one, has none. ``order`` lists dependencies first."""
    tails: dict[str, tuple[float, ...]] = {}
    for name in reversed(list(order)):
        job = jobs.get(name)
        if job is None:
            continue
        behind: float | None = None
        for other, index in waiting.on.get(name, ()):
            if other in tails:
                behind = max(behind or 0.0, tails[other][index])
        for other, minutes in waiting.held.get(name, ()):
            if other in tails:
                behind = max(behind or 0.0, minutes + tails[other][0])
        # Work that waits for a stage of this host counts from the end of that stage.
        after_step: dict[int, float] = {}
        for key in waiting.milestones.get(name, ()):
            stage = key.partition("@")[2]
            at = next((i for i, s in enumerate(job.steps) if s.stage.value == stage), None)
            if at is None:
                continue
            for other, index in waiting.on[key]:
                if other in tails:
                    after_step[at] = max(after_step.get(at, 0.0), tails[other][index])
        own = wave is None or (job.wave == wave and not job.is_step)
        if behind is None and not after_step and not own:
            continue
        tail: list[float] = []
        running = behind or 0.0
        for at in reversed(range(len(job.steps))):
            running = max(running, after_step.get(at, 0.0)) + job.steps[at].minutes
            tail.append(running)
        tail.reverse()
        tails[name] = (*tail, behind or 0.0)
    return tails


class Priorities:
    """The priority of each job's stages, computed once for a run (or a forecast) from its work.

    ``capacities``, ``online`` and ``done_at`` are as for :func:`bound` (default: the inventory's
    pools, nothing online); ``origin``: where this run's minute 0 is on a clock every run shares
    (minutes), so that the numbers of two runs started at different times compare (pool claims).
    """

    def __init__(
        self,
        the_plan: Plan,
        jobs: Mapping[str, Job],
        policy: PriorityPolicy,
        *,
        capacities: Mapping[str, int] | None = None,
        online: Iterable[str] = (),
        done_at: Mapping[str, float] | None = None,
        origin: float = 0.0,
    ) -> None:
        waves = {wave.name: index for index, wave in enumerate(the_plan.waves)}
        order = work_order(the_plan)
        self.order = {name: index for index, name in enumerate(order)}
        self.policy = policy
        self.origin = origin
        estate = the_plan.estate
        # What each host or step is waited for by: hosts that depend on it, steps that need it (or a
        # stage of it), hosts a step gates.
        dependents: dict[str, list[str]] = defaultdict(list)
        for name, host in estate.hosts.items():
            for dependency in host.depends_on:
                dependents[dependency].append(name)
        for step in estate.procedures.values():
            its_needs = {need.name for need in step.needs}
            for need in step.needs:
                dependents[need.name].append(step.name)
            # A host it gates and needs a stage of (the DC it cleans up) counts through the step.
            dependents[step.name].extend(h for h in step.gated_hosts() if h not in its_needs)
        last = len(waves) - 1
        # Dependents before their dependencies: the work order reversed (it puts dependencies first).
        self.need: dict[str, int] = {}
        for name in reversed(order):
            planned = the_plan.hosts.get(name)
            # First-wave infrastructure is restored as far as it is needed: with whoever needs it, and
            # what nothing needs (a second domain controller) with the last wave; so is a step.
            own = waves[planned.own_wave] if planned is not None else last
            if own == 0:
                own = last
            needed = [self.need[d] for d in dependents[name]]
            self.need[name] = min([own, *needed])
        waiting = _Waiting.of(jobs)
        self.tails = _tails(order, jobs, waiting)
        self.latest: dict[str, tuple[float, ...]] = {}
        self.due: dict[int, float] = {}
        if policy is PriorityPolicy.LOOKAHEAD:
            self._latest_starts(the_plan, jobs, order, waiting, capacities, online, done_at)

    def _latest_starts(
        self,
        the_plan: Plan,
        jobs: Mapping[str, Job],
        order: list[str],
        waiting: _Waiting,
        capacities: Mapping[str, int] | None,
        online: Iterable[str],
        done_at: Mapping[str, float] | None,
    ) -> None:
        if capacities is None:
            capacities = {name: pool.capacity for name, pool in the_plan.estate.pools.items()}
        # Due times are a ranking, not a forecast: what no job will bring (a host stuck, a wave not
        # run) counts as there, so that a stuck host does not make its wave due at once.
        online = {*online, *(name for name, job in jobs.items() if not job.steps)}
        for job in jobs.values():
            for dependency, _ in job.gates:
                parsed = split_milestone(dependency)
                if (parsed[0] if parsed is not None else dependency) not in jobs:
                    online.add(dependency)
        everything = sum(job.minutes for job in jobs.values())
        # The first wave is due with whoever needs it (see ``need``), unless it is the only one.
        ranked = range(1, len(the_plan.waves)) if len(the_plan.waves) > 1 else range(1)
        for index in ranked:
            members = [n for n in the_plan.waves[index].hosts if n in jobs]
            minutes = bound(jobs, order, capacities, online, hosts=members, done_at=done_at).minutes
            self.due[index] = (everything if minutes is None else minutes) * (1.0 + STRETCH * index)
            for name, tail in _tails(order, jobs, waiting, index).items():
                starts = tuple(self.due[index] - minutes_left for minutes_left in tail)
                known = self.latest.get(name)
                self.latest[name] = (
                    starts if known is None else tuple(min(a, b) for a, b in zip(known, starts, strict=True))
                )
        for index in range(len(the_plan.waves)):
            self.due.setdefault(index, self.due.get(len(the_plan.waves) - 1, 0.0))

    def key(self, host: str, step: int) -> Key:
        """Smaller goes first."""
        if self.policy is PriorityPolicy.PLAN:
            return (0.0, 0, self.order[host])
        need = self.need[host]
        starts = self.latest.get(host)
        latest = starts[step] if starts is not None else self.due[need] - self.tails[host][step]
        return (latest, need, self.order[host])

    def number(self, host: str, step: int) -> int:
        """The key as one integer, the same ordering: pool claims compare it across runs (a tenth of
        a minute on the shared clock, then the wave's rank, then the plan's order)."""
        latest, need, order = self.key(host, step)
        tenths = min(max(0, round((self.origin + latest) * 10) + _OFFSET), 10**9 - 1)
        return (tenths * 100 + min(need, 99)) * 10**7 + min(order, 10**7 - 1)


_OFFSET = 10**8
"""Tenths of a minute added so that a latest start before the shared clock's zero stays positive (the
number stays under 10**18, inside the ledger's 64-bit column, for some 1,700 planned years)."""
