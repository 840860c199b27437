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
from dataclasses import dataclass

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
    done = set(online)
    chosen = set(jobs) if hosts is None else _with_dependencies(jobs, hosts)
    finish: dict[str, float] = {}
    reached: dict[str, float] = {}
    """Milestones (``host@stage``): when that stage of the host ends."""
    earliest: dict[str, float] = {}
    work: dict[str, float] = defaultdict(float)
    after: dict[str, float] = {}
    unreachable: list[str] = []
    for name in order:
        if name not in chosen:
            continue
        job = jobs[name]
        gated: dict[int, float] = defaultdict(float)
        reachable = True
        for dependency, index in job.gates:
            if dependency in done:
                continue
            at = finish.get(dependency, reached.get(dependency))
            if at is None:
                reachable = False
                break
            gated[index] = max(gated[index], at)
        for wait in job.waits:
            since = finish.get(wait.after)
            if since is None and done_at is not None:
                since = done_at.get(wait.after)
            if since is not None:
                gated[0] = max(gated[0], since + wait.minutes)
        if not reachable:
            unreachable.append(name)
            continue
        clock = 0.0
        left = job.minutes
        for index, step in enumerate(job.steps):
            clock = max(clock, gated.get(index, 0.0))
            left -= step.minutes
            for pool in step.pools:
                earliest[pool] = min(earliest.get(pool, clock), clock)
                work[pool] += step.minutes
                after[pool] = min(after.get(pool, left), left)
            clock += step.minutes
            if isinstance(step.stage, Stage):
                reached[milestone(name, step.stage)] = clock
        finish[name] = clock
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
