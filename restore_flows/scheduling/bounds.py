"""Lower bounds on how soon the work can be done, computed without scheduling. Pure.

No schedule can beat either of these:

* **the longest dependency chain**: each host's stages one after another, each gated stage no earlier
  than its dependencies are online (or the stage of a host it needs is done), each procedure step no
  earlier than its waits allow, with unlimited capacity;
* **each pool**: no stage using it starts before the earliest any of them can (by the chain), the pool
  then needs its total work divided by its capacity, and the host of the last such stage still has at
  least the shortest work any of them has left after its stage.

A wave's bound is the same computed on the wave's hosts and everything they depend on, as if they
had every pool to themselves. Forecasts are measured against these, never against an older version.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from restore_flows.inventory.models import Stage
from restore_flows.inventory.procedures import milestone
from restore_flows.scheduling.work import Job


@dataclass(frozen=True, slots=True)
class Bound:
    minutes: float | None
    """None: some of the work can never be done (it waits for a host that is stuck or not included)."""
    because: str
    chain_minutes: float | None = None
    pool_minutes: Mapping[str, float] | None = None


def bound(
    jobs: Mapping[str, Job],
    order: Iterable[str],
    capacities: Mapping[str, int],
    online: Iterable[str] = (),
    hosts: Iterable[str] | None = None,
    done_at: Mapping[str, float] | None = None,
) -> Bound:
    """The lower bound for ``hosts`` (default: every job) and what they depend on, in minutes from now.

    ``order`` lists hosts and steps dependencies first (``work_order``); ``online`` are dependencies
    already met; ``done_at``: when steps already done were done (minutes from now, negative), for waits.
    """
    chosen = set(jobs) if hosts is None else _with_dependencies(jobs, hosts)
    walk = _Chain(jobs, chosen, set(online), done_at or {})
    unreachable: list[str] = []
    pending = [name for name in order if name in chosen]
    # Each job advances stage by stage, as far as what gates its next stage is known: a step that
    # needs a stage of the host whose release it gates is computed between the two.
    while pending:
        later: list[str] = []
        moved = False
        for name in pending:
            before = walk.at_stage.get(name)
            outcome = walk.advance(name)
            if outcome is False:
                unreachable.append(name)
            elif outcome is None:
                later.append(name)
                moved = moved or walk.at_stage.get(name) != before
            else:
                moved = True
        if not moved:
            unreachable += later
            break
        pending = later
    finish, earliest, work, after = walk.finish, walk.earliest, walk.work, walk.after
    if unreachable:
        return Bound(None, f"{unreachable[0]} waits for a host that will not come online")
    chain = max(finish.values(), default=0.0)
    pools = {
        pool: earliest[pool] + work[pool] / capacities[pool] + after[pool]
        for pool in work
        if capacities.get(pool)
    }
    best, because = chain, "the longest dependency chain"
    for pool, minutes in sorted(pools.items()):
        if minutes > best:
            best, because = minutes, f"pool {pool}"
    return Bound(best, because, chain, pools)


@dataclass
class _Chain:
    """The chain bound's state: when each job, stage and milestone can be done at the earliest."""

    jobs: Mapping[str, Job]
    chosen: set[str]
    done: set[str]
    done_at: Mapping[str, float]
    finish: dict[str, float] = field(default_factory=dict)
    reached: dict[str, float] = field(default_factory=dict)
    """Milestones (``host@stage``): when that stage of the host ends."""
    at_stage: dict[str, tuple[int, float]] = field(default_factory=dict)
    earliest: dict[str, float] = field(default_factory=dict)
    work: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    after: dict[str, float] = field(default_factory=dict)

    def known(self, dependency: str) -> float | bool | None:
        """When it is met; None: not yet computed; False: never (not chosen, not done)."""
        if dependency in self.done:
            return 0.0
        at = self.finish.get(dependency, self.reached.get(dependency))
        if at is not None:
            return at
        return None if dependency.partition("@")[0] in self.chosen else False

    def _start(self, job: Job, index: int, clock: float) -> float | bool | None:
        start = clock
        for dependency, gated in job.gates:
            if gated == index:
                at = self.known(dependency)
                if at is None or at is False:
                    return at
                start = max(start, float(at))
        for wait in job.waits if index == 0 else ():
            since = self.finish.get(wait.after, self.done_at.get(wait.after))
            if since is None and wait.after in self.chosen and wait.after not in self.done:
                return None
            if since is not None:
                start = max(start, since + wait.minutes)
        return start

    def advance(self, name: str) -> bool | None:
        """True: finished; None: stopped on something not known yet; False: can never finish."""
        job = self.jobs[name]
        index, clock = self.at_stage.get(name, (0, 0.0))
        while index < len(job.steps):
            start = self._start(job, index, clock)
            if start is False:
                return False
            if start is None or start is True:
                self.at_stage[name] = (index, clock)
                return None
            step = job.steps[index]
            clock = float(start)
            left = sum(s.minutes for s in job.steps[index + 1 :])
            for pool in step.pools:
                self.earliest[pool] = min(self.earliest.get(pool, clock), clock)
                self.work[pool] += step.minutes
                self.after[pool] = min(self.after.get(pool, left), left)
            clock += step.minutes
            if isinstance(step.stage, Stage):
                self.reached[milestone(name, step.stage)] = clock
            index += 1
        self.finish[name] = clock
        return True


def _with_dependencies(jobs: Mapping[str, Job], hosts: Iterable[str]) -> set[str]:
    chosen: set[str] = set()
    stack = [h for h in hosts if h in jobs]
    while stack:
        name = stack.pop()
        if name in chosen:
            continue
        chosen.add(name)
        for dependency, _ in jobs[name].gates:
            base = dependency.partition("@")[0]
            if base in jobs and base not in chosen:
                stack.append(base)
    return chosen
