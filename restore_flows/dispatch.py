"""Dependency-aware dispatch of one run's hosts: who may start now, who waits and why, who is blocked.

A host starts when every host it depends on is ``online`` in the ledger. A dependency inside the run
that fails blocks its dependents (transitively) with the reason; everything else carries on. A
dependency outside the run (an earlier wave) is waited for, visibly, until ``dependency_timeout``.
Hosts free to start go in the plan's order (wave, then start order), at most ``max_parallel`` at once.

How a host's work is executed is injected (``start``): plain threads for the bypass benchmark and
unit tests, Prefect tasks for the flows. The dispatcher only decides.
"""

from __future__ import annotations

import queue
import time
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
    on_change: Callable[[HostProgress], None] = lambda progress: None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _done: queue.Queue[HostOutcome] = field(default_factory=queue.Queue, init=False)

    def run(self) -> RunSummary:
        started = self.clock()
        estate = self.plan.estate
        order = {name: i for i, name in enumerate(n for w in self.plan.waves for n in w.hosts)}
        members = sorted(set(self.hosts), key=order.__getitem__)
        progress = {name: self._progress(name) for name in members}
        outside = sorted({d for n in members for d in estate.hosts[n].depends_on} - set(members))
        for name, state in self.ledger.states(members).items():
            progress[name].state = state
            if state is HostState.ONLINE:
                self._set(progress[name], Status.ONLINE)
        pending = [n for n in members if progress[n].status is not Status.ONLINE]
        running: set[str] = set()
        waiting_since: dict[str, float] = {}
        while pending or running:
            external = self.ledger.states(outside) if outside else {}
            pending = self._schedule(pending, progress, external, running, waiting_since)
            if running:
                self._collect(progress, running)
            elif pending:
                # Everything left waits for hosts of other waves or runs: look again shortly.
                self.sleep(self.poll_seconds)
        return RunSummary(progress, self.clock() - started)

    def _schedule(
        self,
        pending: list[str],
        progress: Mapping[str, HostProgress],
        external: Mapping[str, HostState],
        running: set[str],
        waiting_since: dict[str, float],
    ) -> list[str]:
        """Start what may start, block what cannot, and return what still waits."""
        still: list[str] = []
        for name in pending:
            verdict, reason, on_outside = self._readiness(name, progress, external)
            item = progress[name]
            if verdict is Status.BLOCKED:
                self._set(item, Status.BLOCKED, reason)
            elif verdict is Status.WAITING:
                first = waiting_since.setdefault(name, self.clock()) if on_outside else self.clock()
                if self.clock() - first > self.dependency_timeout:
                    self._set(
                        item, Status.BLOCKED, f"{reason}: gave up after {self.dependency_timeout:.0f} s"
                    )
                    continue
                if item.reason != reason or item.status is not Status.WAITING:
                    self._set(item, Status.WAITING, reason)
                still.append(name)
            elif len(running) < self.max_parallel:
                running.add(name)
                self._set(item, Status.RUNNING)
                self.start(self.plan.estate.hosts[name], self._done.put)
            else:
                still.append(name)
        return still

    def _collect(self, progress: Mapping[str, HostProgress], running: set[str]) -> None:
        """Take every finished host's outcome; wait up to one poll interval for the first."""
        try:
            outcome = self._done.get(timeout=self.poll_seconds)
        except queue.Empty:
            return
        while True:
            running.discard(outcome.host)
            item = progress[outcome.host]
            item.state = outcome.state
            item.error = outcome.error
            item.stage = outcome.stage
            self._set(item, Status.ONLINE if outcome.online else Status.FAILED, outcome.error)
            try:
                outcome = self._done.get_nowait()
            except queue.Empty:
                return

    def _readiness(
        self, name: str, progress: Mapping[str, HostProgress], external: Mapping[str, HostState]
    ) -> tuple[Status, str | None, bool]:
        """Whether a host may start; why not; and whether it waits on a host outside the run."""
        hosts = self.plan.hosts
        for dependency in self.plan.estate.hosts[name].depends_on:
            wave = hosts[dependency].wave
            inside = progress.get(dependency)
            if inside is not None:
                if inside.status is Status.ONLINE:
                    continue
                if inside.status in (Status.FAILED, Status.BLOCKED):
                    why = inside.error or inside.reason or inside.status.value
                    return (
                        Status.BLOCKED,
                        f"blocked: {dependency} (wave {wave}) {inside.status.value}: {why}",
                        False,
                    )
                return Status.WAITING, f"waiting for {dependency} (wave {wave}) to be online", False
            state = external.get(dependency)
            if state is HostState.ONLINE:
                continue
            if state is not None and state in STUCK:
                return Status.BLOCKED, f"blocked: {dependency} (wave {wave}) is {state.value}", True
            return Status.WAITING, f"waiting for {dependency} (wave {wave}) to be online", True
        return Status.RUNNING, None, False

    def _progress(self, name: str) -> HostProgress:
        host = self.plan.estate.hosts[name]
        return HostProgress(name, self.plan.hosts[name].wave, host.site, host.department)

    def _set(self, item: HostProgress, status: Status, reason: str | None = None) -> None:
        item.status = status
        item.reason = reason
        self.on_change(item)
