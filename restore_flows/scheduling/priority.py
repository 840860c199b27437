"""Who goes first when stages compete for a pool: the host needed soonest. Pure.

A step's priority is, in order:

1. **the earliest wave that needs the host**: its own wave, or that of the earliest host that depends
   on it (transitively). A host of the first wave (core) that others depend on ranks with them alone:
   a domain controller that intensive care needs ranks with intensive care, one that only the offices
   need waits with the offices. A first-wave host nothing depends on keeps the first wave's rank;
2. **the longest chain of work still behind the step**: its own remaining stages, then the longest
   chain among the hosts it gates (from the stage it gates onwards), so that what holds most work back
   starts first; a procedure step's waits count as work behind what they wait for;
3. the plan's order.

The ``plan`` policy ranks by the plan's order alone (earlier wave, then start order), as the restore
did before it looked ahead; kept for comparison in what-if forecasts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from enum import StrEnum

from restore_flows.inventory.procedures import split_milestone
from restore_flows.planning import Plan
from restore_flows.scheduling.work import Job, work_order

Key = tuple[int, float, int]


class PriorityPolicy(StrEnum):
    LOOKAHEAD = "lookahead"
    PLAN = "plan"


class Priorities:
    def __init__(self, the_plan: Plan, jobs: Mapping[str, Job], policy: PriorityPolicy) -> None:
        waves = {wave.name: index for index, wave in enumerate(the_plan.waves)}
        order = work_order(the_plan)
        self.order = {name: index for index, name in enumerate(order)}
        self.policy = policy
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
        # Who waits for what, among the jobs: on a name (online, done) or on a milestone of it.
        waiting: dict[str, list[tuple[str, int]]] = defaultdict(list)
        milestones: dict[str, list[str]] = defaultdict(list)
        for other, gated in jobs.items():
            for dependency, index in gated.gates:
                waiting[dependency].append((other, index))
                parsed = split_milestone(dependency)
                if parsed is not None and dependency not in milestones[parsed[0]]:
                    milestones[parsed[0]].append(dependency)
        held: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for other, held_job in jobs.items():
            for wait in held_job.waits:
                held[wait.after].append((other, wait.minutes))
        self.tails: dict[str, tuple[float, ...]] = {}
        for name in reversed(order):
            job = jobs.get(name)
            if job is None:
                continue
            behind = 0.0
            for other, index in waiting.get(name, ()):
                if other in self.tails:
                    behind = max(behind, self.tails[other][index])
            for other, minutes in held.get(name, ()):
                if other in self.tails:
                    behind = max(behind, minutes + self.tails[other][0])
            # Work that waits for a stage of this host counts from the end of that stage.
            after_step: dict[int, float] = {}
            for key in milestones.get(name, ()):
                stage = key.partition("@")[2]
                at = next((i for i, s in enumerate(job.steps) if s.stage.value == stage), None)
                if at is None:
                    continue
                for other, index in waiting[key]:
                    if other in self.tails:
                        after_step[at] = max(after_step.get(at, 0.0), self.tails[other][index])
            tail: list[float] = []
            running = behind
            for at in reversed(range(len(job.steps))):
                running = max(running, after_step.get(at, 0.0)) + job.steps[at].minutes
                tail.append(running)
            tail.reverse()
            self.tails[name] = (*tail, behind)

    def key(self, host: str, step: int) -> Key:
        """Smaller goes first."""
        if self.policy is PriorityPolicy.PLAN:
            return (0, 0.0, self.order[host])
        return (self.need[host], -self.tails[host][step], self.order[host])

    def number(self, host: str, step: int) -> int:
        """The key as one integer, the same ordering: pool claims compare it across runs."""
        need, tail, order = self.key(host, step)
        tail_rank = 10**9 - 1 - min(int(-tail * 100), 10**9 - 1)
        return (need * 10**9 + tail_rank) * 10**6 + order
