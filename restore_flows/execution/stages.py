"""One stage of one host, through the ledger: the run's lease, the start event, the driver call, the
outcome event. What to run when is the scheduler's decision; this only does it, safely.

The host's *recorded* state decides what may happen: a stage runs only from a state the stage table
starts it from, so a run that resumes after a crash continues where the ledger says the host is and
never repeats a finished destructive stage. A stage left running by a lost run is resolved first, by
asking the fleet whether it finished (``Fleet.stage_finished``); if not, a destructive stage waits
for an operator.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from restore_flows.drivers.base import DriverError, Fleet
from restore_flows.errors import LeaseHeld, LeaseLost, LedgerError
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage
from restore_flows.ledger.records import Lease
from restore_flows.ledger.repository import Ledger
from restore_flows.states import (
    FAILED,
    FINAL,
    RULE,
    STUCK,
    Event,
    HostState,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StageResult:
    """Where a host is after one stage (or after finding it could not run)."""

    host: str
    state: HostState | None
    """None: the host could not be worked on now (``held_by`` says why) and nothing was recorded."""
    error: str | None = None
    retryable: bool = False
    held_by: str | None = None
    gave_up: bool = False
    """This run stops working on the host (the ledger refused, another run took it over, a bug)."""


class _Quarantined(Exception):
    """Verification found indicators of compromise: the host is isolated, the pipeline stops."""

    def __init__(self, state: HostState, detail: str) -> None:
        super().__init__(detail)
        self.state = state
        self.detail = detail


@dataclass
class StageRunner:
    ledger: Ledger
    fleet: Fleet
    run_id: str
    actor: str
    lease_seconds: float = 300.0
    on_change: Callable[[str, Stage | None, HostState], None] = lambda host, stage, state: None
    """Told of every state change (for progress); must be quick and must not raise."""
    _leases: dict[str, Lease] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def run(
        self,
        host: Host,
        stage: Stage,
        claims: Callable[[], Sequence[int]] = tuple,
        *,
        order: tuple[int, str] | None = None,
    ) -> StageResult:
        """Advance ``host`` through ``stage``. Never raises: every problem is a result.

        ``claims`` hands over the pool claims the stage was granted: they are given back with the event
        that ends the stage, in its transaction, or at the latest when this returns. ``order`` (a site's
        stage order and its session): the stage takes the host's lease afresh, for that order only
        (see :meth:`_lease`)."""
        held = list(claims())
        if order is not None:
            self._forget(host.name)
        try:
            return self._run(host, stage, held, order)
        except LeaseLost as exc:
            self._forget(host.name)
            return StageResult(host.name, self._state(host.name), str(exc), gave_up=True)
        except LedgerError as exc:
            self._drop(host.name)
            return StageResult(host.name, self._state(host.name), f"ledger refused: {exc}", gave_up=True)
        except Exception as exc:  # a bug: say so for this host, let the others carry on
            log.exception("%s: unexpected error in %s", host.name, stage.value)
            self._drop(host.name)
            detail = f"unexpected error: {exc!r}\n{traceback.format_exc(limit=5)}"
            return StageResult(host.name, self._state(host.name), detail, gave_up=True)
        finally:
            if held:  # the stage did not get as far as its ending event
                self.ledger.slots.release(held)

    def done_with(self, host: str) -> None:
        """This run is finished with the host (online, or waiting for an operator): give its lease back."""
        self._drop(host)

    def _run(self, host: Host, stage: Stage, held: list[int], order: tuple[int, str] | None) -> StageResult:
        lease = self._lease(host, order)
        if isinstance(lease, str):
            return StageResult(host.name, None, held_by=f"waiting: {lease}")
        state = lease.state
        if lease.interrupted_stage is not None:
            interrupted = Stage(lease.interrupted_stage)
            state = self._resolve_interrupted(host, lease, interrupted)
            lease = self._remember(lease, state)
            if state is RULE[interrupted].failed:
                message = (
                    f"{interrupted.value} was interrupted and may not have finished: an operator decides"
                )
                return StageResult(host.name, state, message, retryable=False)
        rule = RULE[stage]
        if state is rule.failed:
            # Failed earlier in this run and the scheduler decided another attempt is worth it.
            state = self._apply(lease, host, Event.RETRY, None, "automatic retry")
            lease = self._remember(lease, state)
        if state not in rule.starts_from:
            return self._settled(host, state)
        if stage is Stage.EVIDENCE and host.forensic_hold and self.ledger.has_evidence(host.name):
            return self._settled(host, state)  # registered by hand meanwhile: nothing to capture
        state = self._apply(lease, host, rule.start, stage)
        try:
            state = self._perform(host, lease, stage, held)
        except _Quarantined as exc:
            self._drop(host.name)
            return StageResult(host.name, exc.state, exc.detail)
        except DriverError as exc:
            state = self._apply(lease, host, rule.fail, stage, error=exc.detail, release=held)
            self._remember(lease, state)
            return StageResult(host.name, state, str(exc), retryable=exc.retryable)
        self._remember(lease, state)
        return self._settled(host, state)

    def _settled(self, host: Host, state: HostState) -> StageResult:
        if state is FINAL or state in STUCK:
            self._drop(host.name)
        error = None if state not in STUCK else f"needs an operator: host is {state.value}"
        return StageResult(host.name, state, error)

    def _perform(self, host: Host, lease: Lease, stage: Stage, held: list[int]) -> HostState:
        rule = RULE[stage]
        if stage is Stage.EVIDENCE:
            evidence = self.fleet.capture_evidence(host)
            self.ledger.add_evidence(
                host.name, evidence.sha256, evidence.location, evidence.custodian, evidence.kind, self.run_id
            )
            return self._apply(lease, host, rule.done, stage, f"sha256:{evidence.sha256}", release=held)
        detail: str | None = None
        if stage is Stage.WIPE:
            detail = self.fleet.wipe(host)
        elif stage is Stage.REIMAGE:
            detail = self.fleet.reimage(host)
        elif stage is Stage.RESTORE:
            detail = self.fleet.restore_backup(host)
        elif stage is Stage.VERIFY:
            report = self.fleet.verify(host)
            if report.ioc_findings:
                detail = "indicators of compromise: " + "; ".join(report.ioc_findings)
                state = self._apply(lease, host, Event.IOC_FOUND, stage, error=detail, release=held)
                raise _Quarantined(state, detail)
            if report.failures:
                raise DriverError(
                    host.name,
                    stage,
                    "checks failed: " + "; ".join(report.failures),
                    retryable=report.retryable,
                )
        elif stage is Stage.RELEASE:
            detail = self.fleet.release(host)
        return self._apply(lease, host, rule.done, stage, detail, release=held)

    def _resolve_interrupted(self, host: Host, lease: Lease, stage: Stage) -> HostState:
        """A stage left running by a run that is gone: done if the host's facts say so, else resumed.

        Evidence that was recorded is never captured again; a verification's verdict is lost with its
        run, so it is done again; a wipe or an install the fleet cannot vouch for is started again (a
        half-wiped disk is wiped again, under this run's approval). A host that was verified clean is
        never here for a wipe: the ledger refuses to wipe it.
        """
        attempt = self.ledger.open_attempt(host.name)
        lost_run = attempt.run_id if attempt is not None else None
        if stage is Stage.EVIDENCE:
            finished = self.ledger.has_evidence(host.name)
        elif stage is Stage.VERIFY or attempt is None:
            finished = False
        else:
            finished = self.fleet.stage_finished(host, stage, attempt.started_at)
        rule = RULE[stage]
        if finished:
            return self._apply(
                lease,
                host,
                rule.done,
                stage,
                f"the run that started this stage ({lost_run}) was lost; the host's facts show it finished",
            )
        state = self.ledger.resume(
            lease,
            actor=self.actor,
            error=f"run {lost_run} was lost mid-stage and the host's facts do not show the stage finished",
            detail=f"resumed after the crash of run {lost_run}",
        )
        self.on_change(host.name, None, state)
        return state

    # -- leases ----------------------------------------------------------------------------------------

    def _lease(self, host: Host, order: tuple[int, str] | None = None) -> Lease | str:
        """This run's lease on the host, or why another (live) run has it.

        In one process the lease is kept from stage to stage. A site's session takes it for each
        order: another session of the same run (the one it replaced, taken for lost while alive) may
        have worked the host since, and a remembered token would refuse this stage; and a session
        still running an order the scheduler took back must not take the lease from the order's
        successor."""
        with self._lock:
            lease = self._leases.get(host.name)
        if lease is not None:
            return lease
        try:
            lease = self.ledger.acquire(host.name, self.run_id, self.lease_seconds, order=order)
        except LeaseHeld as exc:
            return str(exc)
        with self._lock:
            self._leases[host.name] = lease
        return lease

    def _remember(self, lease: Lease, state: HostState) -> Lease:
        fresh = Lease(lease.host, lease.run_id, lease.token, lease.expires, state, None)
        with self._lock:
            if lease.host in self._leases:
                self._leases[lease.host] = fresh
        return fresh

    def _forget(self, host: str) -> None:
        with self._lock:
            lease = self._leases.pop(host, None)
        if lease is not None:
            self.ledger.forget(lease)

    def _drop(self, host: str) -> None:
        with self._lock:
            lease = self._leases.pop(host, None)
        if lease is not None:
            try:
                self.ledger.release(lease)
            except LedgerError:
                log.warning("%s: could not give the lease back", host, exc_info=True)

    def _state(self, host: str) -> HostState | None:
        try:
            return self.ledger.host(host).state
        except LedgerError:
            return None

    def _apply(
        self,
        lease: Lease,
        host: Host,
        event: Event,
        stage: Stage | None,
        detail: str | None = None,
        *,
        error: str | None = None,
        release: list[int] | None = None,
    ) -> HostState:
        """The event, recorded; ``release``: claims given back in its transaction (emptied once done)."""
        claims = tuple(release or ())
        state = self.ledger.apply(lease, event, actor=self.actor, detail=detail, error=error, release=claims)
        if release:
            release.clear()
        self.on_change(host.name, stage, state)
        return state


def is_failed(state: HostState | None) -> bool:
    return state is not None and state in FAILED
