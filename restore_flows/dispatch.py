"""Dependency-aware dispatch of one run's hosts: who may start now, who waits and why, who is blocked.

A host starts when every host it depends on is ``online`` in the ledger. A dependency inside the run
that fails blocks its dependents (transitively) with the reason; everything else carries on. A
dependency outside the run (an earlier wave) is waited for, visibly, until ``dependency_timeout``.
Hosts free to start go in the plan's order (wave, then start order), at most ``max_parallel`` at once.

How a host's work is executed is injected (``start``): plain threads for the bypass benchmark and
unit tests, Prefect tasks for the flows. The dispatcher only decides.
"""

from __future__ import annotations

import heapq
import queue
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from restore_flows.inventory.estate import Host
from restore_flows.ledger.repository import Ledger
from restore_flows.pipeline import HostOutcome
from restore_flows.planning import Plan
from restore_flows.states import FAILED, HostState

# States in which a dependency outside the run will not come online without an operator.
STUCK = FAILED | {HostState.QUARANTINED, HostState.ON_HOLD}


class Status(StrEnum):
    PENDING = "pending"
    WAITING = "waiting"
    RUNNING = "running"
    ONLINE = "online"
    FAILED = "failed"
    BLOCKED = "blocked"


@dataclass
class HostProgress:
    host: str
    wave: str
    site: str
    department: str
    status: Status = Status.PENDING
    state: HostState = HostState.COMPROMISED
    reason: str | None = None
    error: str | None = None
    stage: str | None = None


@dataclass
class RunSummary:
    hosts: dict[str, HostProgress]
    elapsed_seconds: float

    @property
    def ok(self) -> bool:
        return all(p.status is Status.ONLINE for p in self.hosts.values())

    def count(self, status: Status) -> int:
        return sum(1 for p in self.hosts.values() if p.status == status)

    def failed(self) -> list[HostProgress]:
        return [p for p in self.hosts.values() if p.status is Status.FAILED]

    def blocked(self) -> list[HostProgress]:
        return [p for p in self.hosts.values() if p.status is Status.BLOCKED]


Start = Callable[[Host, Callable[[HostOutcome], None]], None]


@dataclass
class Dispatcher:
    plan: Plan
    hosts: Sequence[str]
    """The run's hosts; dispatched in the plan's order whatever the order given."""
    ledger: Ledger
    start: Start
    max_parallel: int = 16
    dependency_timeout: float = 3600.0
    poll_seconds: float = 0.5
    """How often hosts outside the run are looked up again while something waits for them."""
    on_change: Callable[[HostProgress], None] = lambda progress: None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    restarts: int = 3
    """How often a host whose work never started (executor hiccup) is started again."""
    _done: queue.Queue[HostOutcome] = field(default_factory=queue.Queue, init=False)
    _restarts: Counter[str] = field(default_factory=Counter, init=False)

    def run(self) -> RunSummary:
        """Event-driven: a host is looked at again only when one of its dependencies changed."""
        started = self.clock()
        estate = self.plan.estate
        order = {name: i for i, name in enumerate(n for w in self.plan.waves for n in w.hosts)}
        members = sorted(set(self.hosts), key=order.__getitem__)
        inside = set(members)
        self._progress = {name: self._new_progress(name) for name in members}
        self._unmet: dict[str, list[str]] = {}
        self._dependents: dict[str, list[str]] = defaultdict(list)
        self._waiting_since: dict[str, float] = {}
        self._ready: list[tuple[int, str]] = []
        self._order = order
        for name, state in self.ledger.states(members).items():
            self._progress[name].state = state
        outside = sorted({d for n in members for d in estate.hosts[n].depends_on} - inside)
        external = self.ledger.states(outside) if outside else {}
        for name in members:
            item = self._progress[name]
            if item.state is HostState.ONLINE:
                self._set(item, Status.ONLINE)
                continue
            deps = [
                d
                for d in estate.hosts[name].depends_on
                if (
                    self._progress[d].status is not Status.ONLINE
                    if d in inside
                    else external.get(d) is not HostState.ONLINE
                )
            ]
            self._unmet[name] = deps
            for dependency in deps:
                self._dependents[dependency].append(name)
        for name in members:  # in plan order: dependencies are settled before their dependents
            if name in self._unmet:
                self._settle(name, external)
        running: set[str] = set()
        next_look = self.clock() + self.poll_seconds
        while self._unmet or self._ready or running:
            while self._ready and len(running) < self.max_parallel:
                _, name = heapq.heappop(self._ready)
                running.add(name)
                self._set(self._progress[name], Status.RUNNING)
                self.start(estate.hosts[name], self._done.put)
            waits_outside = any(d not in inside for deps in self._unmet.values() for d in deps)
            if running:
                self._collect(running)
            elif self._unmet and not self._ready:
                if not waits_outside:
                    # Nothing runs and nothing waits outside: what is left can never start. A bug;
                    # say so for each host rather than spin.
                    for name in list(self._unmet):
                        self._block(name, "blocked: its dependencies can no longer start (dispatcher)")
                    continue
                self.sleep(max(0.0, next_look - self.clock()))
            if waits_outside and self.clock() >= next_look:
                next_look = self.clock() + self.poll_seconds
                self._look_outside(inside)
        return RunSummary(self._progress, self.clock() - started)

    def _settle(self, name: str, external: Mapping[str, HostState]) -> None:
        """Decide a pending host from its unmet dependencies: ready, waiting (and why) or blocked."""
        item = self._progress[name]
        unmet = self._unmet[name]
        if not unmet:
            del self._unmet[name]
            heapq.heappush(self._ready, (self._order[name], name))
            return
        first = unmet[0]
        wave = self.plan.hosts[first].wave
        dependency = self._progress.get(first)
        if dependency is not None and dependency.status in (Status.FAILED, Status.BLOCKED):
            why = dependency.error or dependency.reason or dependency.status.value
            self._block(name, f"blocked: {first} (wave {wave}) {dependency.status.value}: {why}")
            return
        state = external.get(first)
        if dependency is None and state is not None and state in STUCK:
            self._block(name, f"blocked: {first} (wave {wave}) is {state.value}")
            return
        reason = f"waiting for {first} (wave {wave}) to be online"
        if dependency is None:
            since = self._waiting_since.setdefault(name, self.clock())
            if self.clock() - since > self.dependency_timeout:
                self._block(name, f"{reason}: gave up after {self.dependency_timeout:.0f} s")
                return
        if item.status is not Status.WAITING or item.reason != reason:
            self._set(item, Status.WAITING, reason)

    def _block(self, name: str, reason: str) -> None:
        """Block a host and, transitively, everything in the run that waits for it."""
        self._unmet.pop(name, None)
        self._set(self._progress[name], Status.BLOCKED, reason)
        for dependent in self._dependents.get(name, ()):
            if dependent in self._unmet:
                self._settle_after(dependent, name)

    def _settle_after(self, dependent: str, changed: str) -> None:
        unmet = self._unmet[dependent]
        if self._progress[changed].status is Status.ONLINE:
            unmet.remove(changed)
        else:
            # Look at the failed dependency first, so the reason names it.
            unmet.remove(changed)
            unmet.insert(0, changed)
        self._settle(dependent, {})

    def _collect(self, running: set[str]) -> None:
        """Take every finished host's outcome; wait up to one poll interval for the first."""
        try:
            first: HostOutcome | None = self._done.get(timeout=self.poll_seconds)
        except queue.Empty:
            return
        outcome = first
        while outcome is not None:
            running.discard(outcome.host)
            if outcome.not_started and self._restarts[outcome.host] < self.restarts:
                self._restarts[outcome.host] += 1
                heapq.heappush(self._ready, (self._order[outcome.host], outcome.host))
            else:
                self._finished(outcome)
            outcome = self._next_done()

    def _finished(self, outcome: HostOutcome) -> None:
        item = self._progress[outcome.host]
        item.state = outcome.state
        item.error = outcome.error
        item.stage = outcome.stage
        self._set(item, Status.ONLINE if outcome.online else Status.FAILED, outcome.error)
        for dependent in self._dependents.get(outcome.host, ()):
            if dependent in self._unmet:
                self._settle_after(dependent, outcome.host)

    def _next_done(self) -> HostOutcome | None:
        try:
            return self._done.get_nowait()
        except queue.Empty:
            return None

    def _look_outside(self, inside: set[str]) -> None:
        """Refresh the states of hosts outside the run that someone still waits for."""
        wanted = sorted({d for deps in self._unmet.values() for d in deps if d not in inside})
        external = self.ledger.states(wanted)
        for name in list(self._unmet):
            if name not in self._unmet:
                continue  # blocked meanwhile by a dependency
            self._unmet[name] = [
                d for d in self._unmet[name] if d in inside or external.get(d) is not HostState.ONLINE
            ]
            self._settle(name, external)

    def _new_progress(self, name: str) -> HostProgress:
        host = self.plan.estate.hosts[name]
        return HostProgress(name, self.plan.hosts[name].wave, host.site, host.department)

    def _set(self, item: HostProgress, status: Status, reason: str | None = None) -> None:
        item.status = status
        item.reason = reason
        self.on_change(item)
