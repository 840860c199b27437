"""The scheduler: which stage of which host may start now. Pure: told what happened, says what to start.

It holds no clock and does no I/O. The runner tells it when stages end (``finished``, ``failed``),
when hosts outside its work come online or get stuck, when a wave is approved and how much of each
pool other runs use; ``decide(now)`` then returns the stages to start, best first, that the pools can
take. The forecast drives the very same object on a virtual clock.

A host's next stage starts when, in this order:

1. every dependency that gates it is online (a dependency that failed, or is blocked, blocks it and,
   through it, whatever depends on it; everything else carries on);
2. for a procedure step: its waits after other steps have passed;
3. its wave is approved;
4. with the ``barrier`` policy, every earlier wave is finished (SRM-style waves, for comparison);
5. for a procedure step that needs one: its named approval, asked for only now that it is due;
6. its retry back-off, if any, has passed;
7. with ``max_hosts``, the host is one of the hosts in flight (a host counts from its first stage to
   its last, as the restore did before: for comparison; a procedure step is not one);
8. each pool it needs has a free slot, and no better stage is waiting for that slot.

Procedure steps are jobs like hosts (see :mod:`restore_flows.scheduling.work`); a milestone
(``host@stage``) is reached when that host's job gets past the stage.

No host holds anything while it waits: only a running stage holds pool slots.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from restore_flows.inventory.procedures import split_milestone
from restore_flows.scheduling.priority import Key, Priorities
from restore_flows.scheduling.work import Job, Phase, Wait, milestones_of


class Status(StrEnum):
    PENDING = "pending"
    """Waiting: for a dependency, an approval, the barrier, a back-off or a place in flight."""
    READY = "ready"
    """Free to start as soon as its pools have a slot."""
    RUNNING = "running"
    DONE = "done"
    """Every stage finished: the host is online."""
    FAILED = "failed"
    """A stage failed for good: an operator decides."""
    BLOCKED = "blocked"
    """A dependency it needs failed or is blocked: it cannot go further."""


TERMINAL = frozenset({Status.DONE, Status.FAILED, Status.BLOCKED})


@dataclass(frozen=True, slots=True)
class Policy:
    barrier: bool = False
    """Start a wave only when every earlier wave is finished (SRM-style)."""
    max_hosts: int | None = None
    """At most this many hosts in flight at once, each from its first stage to its last."""


CAMPAIGN = Policy()
BARRIER = Policy(barrier=True)


@dataclass(frozen=True, slots=True)
class Start:
    host: str
    step: int
    stage: Phase
    pools: tuple[str, ...]
    minutes: float
    priority: int
    """Smaller is more urgent; comparable across runs (pool claims use it)."""


class Scheduler:
    def __init__(
        self,
        jobs: Mapping[str, Job],
        priorities: Priorities,
        capacities: Mapping[str, int],
        *,
        online: Iterable[str] = (),
        approved: Iterable[int] | None = None,
        policy: Policy = CAMPAIGN,
        stuck: Mapping[str, str] | None = None,
        steps: Iterable[str] = (),
        done_at: Mapping[str, float] | None = None,
        approved_steps: Iterable[str] | None = None,
    ) -> None:
        """``jobs``: the hosts (and procedure steps) this scheduler drives. ``online``: hosts, steps
        and milestones (in or outside the jobs) already online or done. ``approved``: wave indexes
        approved (None: all). ``stuck``: hosts outside the jobs that will not come online without an
        operator, with why. ``steps``: the names of every procedure step (for words: a step is "done",
        a host "online"). ``done_at``: when steps already done were done, in this clock's minutes (a
        wait counts from there). ``approved_steps``: steps given their named approval (None: all)."""
        self.jobs = jobs
        self.priorities = priorities
        self.policy = policy
        self.capacity = dict(capacities)
        self._used: dict[str, int] = defaultdict(int)
        self._foreign: dict[str, int] = defaultdict(int)
        self.online: set[str] = set(online)
        self.dead: dict[str, str] = dict(stuck or {})
        """Hosts that will not come online (failed, blocked, stuck outside), with why."""
        self.notes: dict[str, str] = {}
        """What is known of hosts outside the jobs that others wait for (who works on them), for why()."""
        self.status: dict[str, Status] = {}
        self.pos: dict[str, int] = {}
        self._unmet: dict[str, int] = {}
        self._gates_at: dict[str, dict[int, list[str]]] = {}
        self._dependents: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self._not_before: dict[str, float] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self.approved: set[int] | None = None if approved is None else set(approved)
        self._awaiting: dict[int, list[str]] = defaultdict(list)
        self._admitted: set[str] = set()
        self._cap_queue: list[tuple[Key, str]] = []
        self._in_flight = 0
        self._barrier_wait: dict[int, list[str]] = defaultdict(list)
        self._left_in_wave: dict[int, int] = defaultdict(int)
        self._current_wave = 0
        # Ready stages, grouped by the pools they need: a free slot in a pool is offered to the best
        # head of the groups that use it, so a decision never scans every waiting stage.
        self._ready: dict[tuple[str, ...], list[tuple[Key, str]]] = defaultdict(list)
        self._groups_of_pool: dict[str, set[tuple[str, ...]]] = defaultdict(set)
        self._active: set[tuple[str, ...]] = set()
        self.running = 0
        self._started_at: dict[str, float] = {}
        # Hosts waiting for a dependency whose next stage needs a pool: a slot may be kept for them.
        self._gated_on_pool: dict[str, set[str]] = defaultdict(set)
        self._held_back = False
        self.step_names = set(steps) | {name for name, job in jobs.items() if job.is_step}
        self._time = 0.0
        """The latest time the runner told (``decide``, ``finished``): when something got done."""
        self._done_at: dict[str, float] = dict(done_at or {})
        self._wait_until: dict[str, tuple[float, Wait]] = {}
        self.approved_steps: set[str] | None = None if approved_steps is None else set(approved_steps)
        self._awaiting_steps: set[str] = set()
        self.time_label: Callable[[float], str] = lambda minutes: f"minute {minutes:.0f}"
        """How ``why`` names a time of this clock (the campaign sets wall-clock time)."""
        wanted = {dependency for job in jobs.values() for dependency, _ in job.gates}
        self._milestones = {host: sorted(found) for host, found in milestones_of(jobs, wanted).items()}
        for name in wanted:
            parsed = split_milestone(name)
            if parsed is not None and parsed[0] in jobs and parsed[0] not in self._milestones:
                # The host's job no longer has the stage: it was done before this scheduler.
                self.online.add(name)

        self._prepare()

    def _prepare(self) -> None:
        """Index the jobs by dependency and wave, then settle each host's first step."""
        jobs = self.jobs
        for name, job in jobs.items():
            grouped: dict[int, list[str]] = defaultdict(list)
            for dependency, index in job.gates:
                grouped[index].append(dependency)
                self._dependents[dependency].append((name, index))
            self._gates_at[name] = grouped
            self.pos[name] = 0
            self._left_in_wave[job.wave] += 1
        if self.policy.barrier:
            self._current_wave = min((job.wave for job in jobs.values()), default=0)
        for name, job in jobs.items():
            self.status[name] = Status.PENDING
            if not job.steps:
                self.status[name] = Status.DONE
                self.online.add(name)
                self._left_in_wave[job.wave] -= 1
        if self.policy.barrier:
            self._advance_barrier()
        for name in jobs:
            if self.status[name] is Status.PENDING:
                self._enter_step(name, self._gated(name, upto=True))

    # -- what the runner tells it --------------------------------------------------------------------

    def decide(self, now: float) -> list[Start]:
        """The stages to start now, best first. They count as running until ``finished``/``failed``."""
        self._time = max(self._time, now)
        while self._timers and self._timers[0][0] <= now:
            _, _, name = heapq.heappop(self._timers)
            if self.status[name] is Status.PENDING and self._not_before.get(name, 0.0) <= now:
                self._not_before.pop(name, None)
                self._try_ready(name, now)
        starts: list[Start] = []
        held_back: list[tuple[str, ...]] = []
        while self._active:
            group = min(self._active, key=lambda g: self._ready[g][0][0])
            key, name = self._ready[group][0]
            minutes = self.jobs[name].steps[self.pos[name]].minutes
            if any(self._reserved(pool, key, now, minutes) >= self._free(pool) for pool in group):
                # A better stage will want this pool before this one would be done: keep the slot.
                self._active.discard(group)
                held_back.append(group)
                continue
            heapq.heappop(self._ready[group])
            if not self._ready[group]:
                self._active.discard(group)
            starts.append(self._start(name, now))
        for group in held_back:
            if self._ready[group] and self._fits(group):
                self._active.add(group)
        self._held_back = bool(held_back)
        return starts

    def already_running(self, host: str) -> Start:
        """The host's current stage was started before this scheduler existed (a forecast of a run in
        progress): count it as running, whatever its gates and pools say now."""
        if self.status[host] is Status.READY:
            self._unready(host)
        return self._start(host, 0.0)

    def finished(self, host: str, next_step: int | None = None, at: float | None = None) -> None:
        """The running stage ended well; the host continues at ``next_step`` (default: the next one).
        ``at``: when (what waits for it counts from there; default: the last ``decide``)."""
        if at is not None:
            self._time = max(self._time, at)
        self._stop_running(host)
        step = self.pos[host] + 1 if next_step is None else next_step
        self._move(host, step)

    def moved(self, host: str, next_step: int) -> None:
        """A host that was not running turned out to be elsewhere in its pipeline (the ledger says so)."""
        if self.status[host] is Status.RUNNING:
            self._stop_running(host)
        elif self.status[host] is Status.READY:
            self._unready(host)
        elif self.status[host] in TERMINAL:
            return
        self._move(host, next_step)

    def failed(self, host: str, retry_at: float | None, why: str) -> None:
        """The running stage failed: again at ``retry_at``, or for good (None)."""
        self._stop_running(host)
        if retry_at is not None:
            self._not_before[host] = retry_at
            self.status[host] = Status.PENDING
            self._try_ready(host, None)
            return
        self._end(host, Status.FAILED, why)

    def retry_later(self, host: str, at: float) -> None:
        """A stage that could not start after all (the host was held elsewhere): try again at ``at``."""
        if self.status[host] is Status.RUNNING:
            self._stop_running(host)
        elif self.status[host] is Status.READY:
            self._unready(host)
        self.status[host] = Status.PENDING
        self._not_before[host] = at
        self._try_ready(host, None)

    def give_up(self, host: str, status: Status, why: str) -> None:
        """Stop driving a host that is not running (found stuck in the ledger, never came online...)."""
        if self.status[host] is Status.READY:
            self._unready(host)
        elif self.status[host] is Status.RUNNING:
            self._stop_running(host)
        if self.status[host] not in TERMINAL:
            self._end(host, status, why)

    def denied(self, host: str) -> None:
        """The ledger would not grant the stage's pools (another run needs them first): back to ready."""
        self._stop_running(host)
        self.status[host] = Status.PENDING
        self._try_ready(host, None)

    def outside_online(self, host: str, at: float | None = None) -> None:
        """A host (or step, or milestone) outside the jobs came online; ``at``: when, if known."""
        if host not in self.online and host not in self.jobs:
            self.dead.pop(host, None)
            if at is not None:
                self._done_at[host] = at
            self._now_online(host)

    def outside_stuck(self, host: str, why: str) -> None:
        """A host outside the jobs will not come online without an operator."""
        if host not in self.jobs and host not in self.online and host not in self.dead:
            self.dead[host] = why
            self._block_dependents(host)

    def approve_step(self, name: str) -> None:
        """A procedure step got its named approval."""
        if self.approved_steps is None or name in self.approved_steps:
            return
        self.approved_steps.add(name)
        if name in self._awaiting_steps:
            self._awaiting_steps.discard(name)
            if self.status[name] is Status.PENDING:
                self._try_ready(name, None)

    def steps_awaiting_approval(self) -> list[str]:
        """Procedure steps that are due (needs met, waits over) and wait only for their approval."""
        return sorted(n for n in self._awaiting_steps if self.status[n] is Status.PENDING)

    def done_at(self, name: str) -> float | None:
        """When a host came online or a step was done, in this clock's minutes (None: not yet, or
        before this scheduler without a known time)."""
        return self._done_at.get(name)

    def approve(self, wave: int) -> None:
        if self.approved is None or wave in self.approved:
            return
        self.approved.add(wave)
        for name in self._awaiting.pop(wave, []):
            if self.status[name] is Status.PENDING:
                self._try_ready(name, None)

    def set_foreign(self, pool: str, used: int) -> None:
        """How many slots of ``pool`` other runs hold (or are owed first)."""
        before = self._free(pool)
        self._foreign[pool] = max(0, used)
        if before <= 0 < self._free(pool):
            self._reactivate(pool)
        elif self._free(pool) <= 0:
            for group in self._groups_of_pool.get(pool, ()):
                self._active.discard(group)

    # -- what the runner asks ------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def busy(self) -> bool:
        """Something runs or will become ready by itself (a back-off, a wait)."""
        return self.running > 0 or bool(self._timers) or bool(self._active)

    def unfinished(self) -> list[str]:
        return [name for name, status in self.status.items() if status not in TERMINAL]

    def waits_for_outside(self) -> set[str]:
        """Hosts outside the jobs that some pending host waits for."""
        wanted: set[str] = set()
        for name, status in self.status.items():
            if status is Status.PENDING and self._unmet.get(name):
                for dependency in self._current_gates(name):
                    if dependency not in self.jobs and dependency not in self.online:
                        wanted.add(dependency)
        return wanted

    def waiting_for_slots(self, per_pool: int) -> list[Start]:
        """The best ready stages that wait only for pool slots (at most ``per_pool`` per set of pools):
        filed as waiting claims, they keep their place against other runs."""
        found: list[Start] = []
        for group, heap in self._ready.items():
            if not group or not heap or self._fits(group):
                continue
            for _, name in heapq.nsmallest(per_pool, heap):
                step = self.jobs[name].steps[self.pos[name]]
                found.append(
                    Start(
                        name,
                        self.pos[name],
                        step.stage,
                        step.pools,
                        step.minutes,
                        self.priorities.number(name, self.pos[name]),
                    )
                )
        return found

    def waits_for_others(self) -> bool:
        """Some ready stage waits for slots that other runs hold: they will give them back."""
        return any(
            heap and not self._fits(group) and any(self._foreign[pool] > 0 for pool in group)
            for group, heap in self._ready.items()
        )

    def waiting_for_approval(self) -> set[int]:
        return {wave for wave, names in self._awaiting.items() if names}

    def why(self, host: str) -> str:
        """Why a host is where it is, in words for people."""
        status = self.status[host]
        job = self.jobs[host]
        if status is Status.DONE:
            return "online"
        if status in (Status.FAILED, Status.BLOCKED):
            return self.dead.get(host, status.value)
        step = job.steps[self.pos[host]]
        if status is Status.RUNNING:
            return f"{step.stage.value} running"
        if status is Status.READY:
            full = [p for p in step.pools if self._free(p) <= 0]
            if full:
                pool = full[0]
                return f"waiting for a slot in {pool} ({self.capacity.get(pool, 0)} in use)"
            return f"ready to {step.stage.value}"
        unmet = [d for d in self._current_gates(host) if d not in self.online]
        if unmet:
            first = unmet[0]
            note = self.notes.get(first)
            return (
                f"waiting for {self._awaited(first)} before {step.stage.value}"
                + (f" (and {len(unmet) - 1} more)" if len(unmet) > 1 else "")
                + (f": {note}" if note else "")
            )
        if host in self._wait_until and self._wait_until[host][0] > self._time:
            until, wait = self._wait_until[host]
            return (
                f"waiting until {self.time_label(until)}: {_duration(wait.minutes)} after {wait.after} "
                f"({wait.reason})"
            )
        if self.approved is not None and job.wave not in self.approved:
            return "waiting for the wave's approval"
        if self.policy.barrier and job.wave > self._current_wave:
            return "waiting for the earlier waves to finish (barrier)"
        if host in self._awaiting_steps:
            return f"waiting for a named approval of step {host}"
        if host in self._not_before:
            return f"retrying {step.stage.value} after a back-off"
        if self.policy.max_hosts is not None and host not in self._admitted:
            return f"waiting for one of the {self.policy.max_hosts} places in flight"
        return "pending"

    def _awaited(self, name: str) -> str:
        parsed = split_milestone(name)
        if parsed is not None:
            return f"{parsed[0]} to finish {parsed[1].value}"
        if name in self.step_names:
            return f"step {name} to be done"
        return f"{name} to be online"

    def pool_use(self, pool: str) -> tuple[int, int]:
        """(slots used by this scheduler's stages, by others) of a pool."""
        return self._used[pool], self._foreign[pool]

    # -- inside ----------------------------------------------------------------------------------------

    def _free(self, pool: str) -> int:
        return self.capacity.get(pool, 0) - self._used[pool] - self._foreign[pool]

    def _fits(self, group: tuple[str, ...]) -> bool:
        return all(self._free(pool) > 0 for pool in group)

    def _reserved(self, pool: str, key: Key, now: float, minutes: float) -> int:
        """How many slots of ``pool`` to keep for better stages rather than start a stage of ``minutes``.

        A better stage counts when its gates are all hosts running their last stages and it is due
        within half of ``minutes``: then idling until it comes costs less than the wait it would
        have behind this stage. For hosts needed by the same wave, "better" must also mean a latest
        start earlier by more than this stage lasts: a small lead is not worth an idle slot.
        """
        count = 0
        horizon = now + minutes / 2
        for name in self._gated_on_pool.get(pool, ()):
            other = self.priorities.key(name, self.pos[name])
            if other >= key:
                continue
            if other[1] == key[1] and key[0] - other[0] < minutes:
                continue
            due = 0.0
            for dependency in self._current_gates(name):
                if dependency in self.online:
                    continue
                eta = self._online_eta(dependency)
                if eta is None:
                    break
                due = max(due, eta)
            else:
                if due <= horizon:
                    count += 1
        return count

    def _online_eta(self, name: str) -> float | None:
        """When a running host should be online, if what is left of it needs no pool or dependency."""
        if self.status.get(name) is not Status.RUNNING:
            return None
        job = self.jobs[name]
        position = self.pos[name]
        eta = self._started_at[name] + job.steps[position].minutes
        for index in range(position + 1, len(job.steps)):
            step = job.steps[index]
            if step.pools or self._gates_at[name].get(index):
                return None
            eta += step.minutes
        return eta

    def _start(self, name: str, now: float) -> Start:
        job = self.jobs[name]
        step_index = self.pos[name]
        step = job.steps[step_index]
        self._started_at[name] = now
        self.status[name] = Status.RUNNING
        self.running += 1
        for pool in step.pools:
            self._used[pool] += 1
            if self._free(pool) <= 0:
                for group in self._groups_of_pool[pool]:
                    self._active.discard(group)
        return Start(
            name,
            step_index,
            step.stage,
            step.pools,
            step.minutes,
            self.priorities.number(name, step_index),
        )

    def _stop_running(self, name: str) -> None:
        if self.status[name] is not Status.RUNNING:
            raise ValueError(f"{name} is not running (it is {self.status[name].value})")
        self.running -= 1
        self.status[name] = Status.PENDING
        for pool in self.jobs[name].steps[self.pos[name]].pools:
            self._used[pool] -= 1
            if self._free(pool) == 1:
                self._reactivate(pool)

    def _reactivate(self, pool: str) -> None:
        for group in self._groups_of_pool.get(pool, ()):
            if self._ready[group] and self._fits(group):
                self._active.add(group)

    def _unready(self, name: str) -> None:
        step = self.jobs[name].steps[self.pos[name]]
        heap = self._ready[step.pools]
        heap[:] = [entry for entry in heap if entry[1] != name]
        heapq.heapify(heap)
        if not heap:
            self._active.discard(step.pools)
        self.status[name] = Status.PENDING

    def _move(self, name: str, step: int) -> None:
        job = self.jobs[name]
        self.status[name] = Status.PENDING
        self._not_before.pop(name, None)
        for index, key in self._milestones.get(name, ()):
            if index < step and key not in self.online:
                self._now_online(key)
        if step >= len(job.steps):
            self.pos[name] = len(job.steps)
            self._end(name, Status.DONE, "online")
            return
        # The usual move is one step on: only the gates of the new step are new. A jump (resume, retry,
        # a state found in the ledger) checks every gate up to the step.
        upto = step != self.pos[name] + 1
        self.pos[name] = step
        self._enter_step(name, self._gated(name, upto=upto))

    def _gated(self, name: str, upto: bool) -> list[str]:
        """Dependencies gating the current step: only those newly applying, or all up to it."""
        gates = self._gates_at[name]
        if upto:
            return [d for index, deps in gates.items() if index <= self.pos[name] for d in deps]
        return list(gates.get(self.pos[name], ()))

    def _current_gates(self, name: str) -> list[str]:
        return self._gated(name, upto=True)

    def _enter_step(self, name: str, gates: Sequence[str]) -> None:
        unmet = 0
        for dependency in gates:
            if dependency in self.dead:
                self._end(name, Status.BLOCKED, f"blocked: {dependency} {_short(self.dead[dependency])}")
                return
            if dependency not in self.online:
                unmet += 1
        self._unmet[name] = unmet
        if unmet == 0:
            self._try_ready(name, None)
        else:
            for pool in self.jobs[name].steps[self.pos[name]].pools:
                self._gated_on_pool[pool].add(name)

    def _try_ready(self, name: str, now: float | None) -> None:
        job = self.jobs[name]
        if self._unmet.get(name):
            return
        for pool in job.steps[self.pos[name]].pools:
            self._gated_on_pool[pool].discard(name)
        if job.waits:
            until = self._wait_end(job)
            if until is not None and (now is None or until > now):
                # Checked again when the timer fires (``decide``), with the time then.
                heapq.heappush(self._timers, (until, next(self._seq), name))
                return
        if self.approved is not None and job.wave not in self.approved:
            self._awaiting[job.wave].append(name)
            return
        if self.policy.barrier and job.wave > self._current_wave:
            self._barrier_wait[job.wave].append(name)
            return
        if job.approval and self.approved_steps is not None and name not in self.approved_steps:
            self._awaiting_steps.add(name)
            return
        not_before = self._not_before.get(name)
        if not_before is not None and (now is None or not_before > now):
            heapq.heappush(self._timers, (not_before, next(self._seq), name))
            return
        self._not_before.pop(name, None)
        # A procedure step is not a host: it takes none of the places in flight (the restore that
        # capped hosts had no steps; counting them would let DCs waiting for a step hold every place).
        if self.policy.max_hosts is not None and name not in self._admitted and not job.is_step:
            if self._in_flight >= self.policy.max_hosts:
                heapq.heappush(self._cap_queue, (self.priorities.key(name, self.pos[name]), name))
                return
            self._admitted.add(name)
            self._in_flight += 1
        step = job.steps[self.pos[name]]
        self.status[name] = Status.READY
        group = step.pools
        if group not in self._ready:
            for pool in group:
                self._groups_of_pool[pool].add(group)
        heapq.heappush(self._ready[group], (self.priorities.key(name, self.pos[name]), name))
        if self._fits(group):
            self._active.add(group)

    def _wait_end(self, job: Job) -> float | None:
        """The time the job's waits end (None: none applies), remembered for ``why``."""
        latest: tuple[float, Wait] | None = None
        for wait in job.waits:
            done = self._done_at.get(wait.after)
            if done is not None and (latest is None or done + wait.minutes > latest[0]):
                latest = (done + wait.minutes, wait)
        if latest is None:
            return None
        self._wait_until[job.host] = latest
        return latest[0]

    def _end(self, name: str, status: Status, why: str) -> None:
        self._settle(name, status, why)
        if status is Status.DONE:
            self._now_online(name)
        else:
            self._block_dependents(name)

    def _settle(self, name: str, status: Status, why: str) -> None:
        """Record a host's end and what it frees (a place in flight, the barrier); nothing about its
        dependents."""
        self.status[name] = status
        job = self.jobs[name]
        if self.pos[name] < len(job.steps):
            for pool in job.steps[self.pos[name]].pools:
                self._gated_on_pool[pool].discard(name)
        job = self.jobs[name]
        self._left_in_wave[job.wave] -= 1
        if name in self._admitted:
            self._admitted.discard(name)
            self._in_flight -= 1
            self._admit_next()
        if status is Status.DONE:
            self.dead.pop(name, None)
        else:
            self.dead[name] = why
        if self.policy.barrier:
            self._advance_barrier()

    def _admit_next(self) -> None:
        while self._cap_queue and self._in_flight < (self.policy.max_hosts or 0):
            _, name = heapq.heappop(self._cap_queue)
            if self.status[name] is Status.PENDING:
                self._try_ready(name, None)

    def _now_online(self, name: str) -> None:
        self.online.add(name)
        self._done_at.setdefault(name, self._time)
        for dependent, index in self._dependents.get(name, ()):
            if self.status.get(dependent) is Status.PENDING and index <= self.pos[dependent]:
                self._unmet[dependent] -= 1
                if self._unmet[dependent] == 0:
                    self._try_ready(dependent, None)

    def _block_dependents(self, name: str) -> None:
        # Iterative: a chain of thousands of hosts must not exhaust the interpreter's stack.
        todo = [name, *self._lost_milestones(name)]
        while todo:
            current = todo.pop()
            why = self.dead[current]
            for dependent, index in self._dependents.get(current, ()):
                status = self.status.get(dependent)
                if status in (Status.PENDING, Status.READY) and index <= self.pos[dependent]:
                    if status is Status.READY:
                        self._unready(dependent)
                    self._settle(dependent, Status.BLOCKED, f"blocked: {current} {_short(why)}")
                    todo.append(dependent)
                    todo.extend(self._lost_milestones(dependent))

    def _lost_milestones(self, name: str) -> list[str]:
        """The milestones a host that stopped will not reach, marked dead (with its reason)."""
        lost = []
        for _, key in self._milestones.get(name, ()):
            if key not in self.online and key not in self.dead:
                self.dead[key] = self.dead.get(name, "stopped")
                lost.append(key)
        return lost

    def _advance_barrier(self) -> None:
        waves = sorted(w for w, left in self._left_in_wave.items() if left > 0)
        target = waves[0] if waves else max(self._left_in_wave, default=0) + 1
        while self._current_wave < target:
            self._current_wave += 1
            for wave in [w for w in self._barrier_wait if w <= self._current_wave]:
                for name in self._barrier_wait.pop(wave):
                    if self.status[name] is Status.PENDING:
                        self._try_ready(name, None)


def _short(why: str) -> str:
    return why.removeprefix("blocked: ")


def _duration(minutes: float) -> str:
    if minutes >= 60 and minutes % 60 == 0:
        return f"{minutes / 60:g} h"
    return f"{minutes:g} min"
