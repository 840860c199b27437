"""The loop that runs a scheduler: decide, start, wait for outcomes, tell the scheduler, again.

What starts a stage (threads, Prefect tasks, the virtual clock's queue) and where facts from outside
come from (the ledger: other runs, approvals, pools; or nothing, in a forecast) are injected, so that
the live run, the rehearsal and the forecast go through this same loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from restore_flows.scheduling.clock import Clock, Outcome, Result
from restore_flows.scheduling.scheduler import Scheduler, Start, Status


class Starter(Protocol):
    def start(self, start: Start) -> None:
        """Begin the stage; its outcome arrives through the clock."""
        ...


class World(Protocol):
    """Facts from outside the scheduler's own stages."""

    poll_minutes: float

    def refresh(self, scheduler: Scheduler, now: float) -> None:
        """Tell the scheduler what changed: hosts outside it online or stuck, approvals, pools."""
        ...

    def grant(self, starts: Sequence[Start], scheduler: Scheduler) -> list[Start]:
        """The stages whose pool slots are granted; for the others, tell the scheduler who holds them."""
        ...

    def release(self, start: Start) -> None: ...

    def may_change(self, scheduler: Scheduler, now: float) -> bool:
        """Whether waiting can still bring progress when nothing of the scheduler's own runs."""
        ...


class Observer(Protocol):
    def started(self, start: Start, now: float) -> None: ...

    def ended(self, start: Start, outcome: Outcome, now: float) -> None:
        """After the scheduler was told: its status of the host says what happens next."""
        ...


class StaticWorld:
    """Nothing changes from outside; the scheduler's own pool accounting is the truth (forecasts)."""

    poll_minutes = float("inf")

    def refresh(self, scheduler: Scheduler, now: float) -> None:
        pass

    def grant(self, starts: Sequence[Start], scheduler: Scheduler) -> list[Start]:
        return list(starts)

    def release(self, start: Start) -> None:
        pass

    def may_change(self, scheduler: Scheduler, now: float) -> bool:
        return False


class QuietObserver:
    def started(self, start: Start, now: float) -> None:
        pass

    def ended(self, start: Start, outcome: Outcome, now: float) -> None:
        pass


@dataclass(frozen=True)
class Retries:
    attempts: int = 3
    """Attempts per stage, when its error may be transient, before an operator."""
    backoff_minutes: tuple[float, ...] = (1 / 60, 5 / 60, 15 / 60)

    def after(self, failures: int) -> float:
        delays = self.backoff_minutes
        return delays[min(failures - 1, len(delays) - 1)] if delays else 0.0


def run(
    scheduler: Scheduler,
    clock: Clock,
    starter: Starter,
    world: World,
    *,
    retries: Retries | None = None,
    observer: Observer | None = None,
    running: Sequence[Start] = (),
) -> None:
    """Until nothing is left that could still move. ``running``: stages already started (a forecast
    from a run in progress), which are waited for like the loop's own."""
    retries = retries or Retries()
    observer = observer or QuietObserver()
    current: dict[str, Start] = {start.host: start for start in running}
    failures: Counter[tuple[str, int]] = Counter()
    last_look = float("-inf")
    while True:
        now = clock.now()
        if now - last_look >= world.poll_minutes:
            world.refresh(scheduler, now)
            last_look = now
        starts = scheduler.decide(now)
        if starts:
            granted = world.grant(starts, scheduler)
            chosen = {start.host for start in granted}
            for start in starts:
                if start.host not in chosen:
                    scheduler.denied(start.host)
            for start in granted:
                current[start.host] = start
                observer.started(start, now)
                starter.start(start)
        if not current and not scheduler.busy() and not world.may_change(scheduler, now):
            return
        until = scheduler.next_timer()
        if world.poll_minutes != float("inf"):
            look = last_look + world.poll_minutes
            until = look if until is None else min(until, look)
        if not current and until is None:
            return  # nothing runs and nothing will wake us: only a bug gets here; never hang
        for outcome in clock.wait(until):
            if outcome.host not in current:
                continue  # not ours (a stale delivery after the host was given up)
            start = current.pop(outcome.host)
            now = clock.now()
            world.release(start)
            _apply(scheduler, start, outcome, now, failures, retries, world.poll_minutes)
            observer.ended(start, outcome, now)


def _apply(
    scheduler: Scheduler,
    start: Start,
    outcome: Outcome,
    now: float,
    failures: Counter[tuple[str, int]],
    retries: Retries,
    poll: float,
) -> None:
    host = start.host
    if outcome.result is Result.DONE:
        scheduler.finished(host, outcome.next_step, at=now)
    elif outcome.result is Result.FAILED:
        failures[(host, start.step)] += 1
        count = failures[(host, start.step)]
        again = outcome.retryable and count < retries.attempts
        scheduler.failed(host, now + retries.after(count) if again else None, outcome.error or "failed")
    elif outcome.result is Result.MOVED:
        if outcome.next_step is None:
            scheduler.retry_later(host, now + (poll if poll != float("inf") else 0.0))
        else:
            scheduler.moved(host, outcome.next_step)
    else:
        scheduler.give_up(host, Status.FAILED, outcome.error or "needs an operator")
