"""Two clocks for one scheduler: real time, where finished stages arrive from other threads, and a
virtual clock, where they are events in a queue and time jumps to the next one (no sleeping).

Both count minutes since they started and hand the runner the outcomes of finished stages.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Result(StrEnum):
    DONE = "done"
    """The stage finished; the host goes on at ``next_step``."""
    FAILED = "failed"
    MOVED = "moved"
    """The stage did not run: the host is elsewhere in its pipeline (``next_step``), or, with
    ``next_step`` None, it could not be worked on now (held by another run) and is tried again later."""
    STUCK = "stuck"
    """The host needs an operator (quarantined, failed before, on hold): this run leaves it."""


@dataclass(frozen=True, slots=True)
class Outcome:
    host: str
    result: Result
    next_step: int | None = None
    retryable: bool = False
    error: str | None = None
    attempt: int = 1
    """Which attempt of the stage this was, in this run."""


class Clock(Protocol):
    def now(self) -> float:
        """Minutes since the clock started."""
        ...

    def wait(self, until: float | None) -> list[Outcome]:
        """Outcomes that arrived, waiting for the first one at most until ``until`` (None: no limit)."""
        ...


class VirtualClock:
    """Time is the next event's: ``after`` files an outcome for later, ``wait`` jumps to it."""

    def __init__(self) -> None:
        self._now = 0.0
        self._events: list[tuple[float, int, Outcome]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def after(self, minutes: float, outcome: Outcome) -> None:
        heapq.heappush(self._events, (self._now + max(0.0, minutes), next(self._seq), outcome))

    def pending(self) -> int:
        return len(self._events)

    def wait(self, until: float | None) -> list[Outcome]:
        if not self._events or (until is not None and self._events[0][0] > until):
            if until is not None:
                self._now = max(self._now, until)
            return []
        at = self._events[0][0]
        self._now = max(self._now, at)
        arrived = []
        while self._events and self._events[0][0] <= at:
            arrived.append(heapq.heappop(self._events)[2])
        return arrived


class RealClock:
    """Real time; outcomes are delivered from the threads that ran the stages."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._started = monotonic()
        self._inbox: queue.Queue[Outcome] = queue.Queue()

    def now(self) -> float:
        return (self._monotonic() - self._started) / 60.0

    def deliver(self, outcome: Outcome) -> None:
        """Thread-safe."""
        self._inbox.put(outcome)

    def wait(self, until: float | None) -> list[Outcome]:
        timeout = None if until is None else max(0.0, (until - self.now()) * 60.0)
        try:
            first = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return []
        arrived = [first]
        while True:
            try:
                arrived.append(self._inbox.get_nowait())
            except queue.Empty:
                return arrived
