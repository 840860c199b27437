"""Who goes first when stages compete for a pool: the host needed soonest. Pure.

A step's priority is, in order:

1. **the earliest wave that needs the host**: its own wave, or that of the earliest host that depends
   on it (transitively). A host of the first wave (core) that others depend on ranks with them alone:
   a domain controller that intensive care needs ranks with intensive care, one that only the offices
   need waits with the offices. A first-wave host nothing depends on keeps the first wave's rank;
2. **the longest chain of work still behind the step**: its own remaining stages, then the longest
   chain among the hosts it gates (from the stage it gates onwards), so that what holds most work back
   starts first;
3. the plan's order.

The ``plan`` policy ranks by the plan's order alone (earlier wave, then start order), as the restore
did before it looked ahead; kept for comparison in what-if forecasts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from enum import StrEnum

from restore_flows.planning import Plan
from restore_flows.scheduling.work import Job

Key = tuple[int, float, int]


class PriorityPolicy(StrEnum):
    LOOKAHEAD = "lookahead"
    PLAN = "plan"


class Priorities:
    def __init__(self, the_plan: Plan, jobs: Mapping[str, Job], policy: PriorityPolicy) -> None:
        waves = {wave.name: index for index, wave in enumerate(the_plan.waves)}
        order = [name for wave in the_plan.waves for name in wave.hosts]
        self.order = {name: index for index, name in enumerate(order)}
        self.policy = policy
        hosts = the_plan.estate.hosts
        dependents: dict[str, list[str]] = defaultdict(list)
        for name in order:
            for dependency in hosts[name].depends_on:
                dependents[dependency].append(name)
        # Dependents before their dependencies: the plan's order reversed (it puts dependencies first).
        self.need: dict[str, int] = {}
        for name in reversed(order):
            own = waves[the_plan.hosts[name].own_wave]
            needed = [self.need[d] for d in dependents[name]]
            if own == 0:
                # First-wave infrastructure is restored as far as it is needed: with whoever needs
                # it, and what nothing needs (a second domain controller) with the last wave.
                own = len(waves) - 1
            self.need[name] = min([own, *needed])
        self.tails: dict[str, tuple[float, ...]] = {}
        for name in reversed(order):
            job = jobs.get(name)
            if job is None:
                continue
            behind = 0.0
            for dependent in dependents[name]:
                other = jobs.get(dependent)
                if other is None:
                    continue
                gated = next((index for dep, index in other.gates if dep == name), None)
                if gated is not None:
                    behind = max(behind, self.tails[dependent][gated])
            tail: list[float] = []
            running = behind
            for step in reversed(job.steps):
                running += step.minutes
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
