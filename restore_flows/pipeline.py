"""One host's way through the restore: evidence, wipe, reimage or restore, verify, release.

Every step goes through the ledger: the run holds the host's lease, each stage is a start event, the
driver call, then an outcome event. The next step is chosen from the host's *recorded* state, so a run
that resumes after a crash continues where the ledger says the host is, and never repeats a finished
destructive stage. A stage left running by a lost run is resolved first, by asking the fleet whether it
finished (``Fleet.stage_finished``); if not, a destructive stage waits for an operator.

Pools are claimed per stage (``Slots.hold``), waiting in clinical-priority order across runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from restore_flows.drivers.base import DriverError, Fleet
from restore_flows.errors import LeaseHeld, LeaseLost, LedgerError
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import RestoreMethod, Stage
from restore_flows.ledger.records import Lease
from restore_flows.ledger.repository import Ledger
from restore_flows.settings import Settings
from restore_flows.states import FAILED, Event, HostState

log = logging.getLogger(__name__)

# Which stage a failed state belongs to, and whether repeating that stage changes a disk.
FAILED_STAGE: Mapping[HostState, Stage] = {
    HostState.EVIDENCE_FAILED: Stage.EVIDENCE,
    HostState.WIPE_FAILED: Stage.WIPE,
    HostState.REIMAGE_FAILED: Stage.REIMAGE,
    HostState.RESTORE_FAILED: Stage.RESTORE,
    HostState.VERIFY_FAILED: Stage.VERIFY,
    HostState.RELEASE_FAILED: Stage.RELEASE,
}
DESTRUCTIVE_STAGES = frozenset({Stage.WIPE, Stage.REIMAGE, Stage.RESTORE})
DONE_EVENT: Mapping[Stage, Event] = {
    Stage.EVIDENCE: Event.EVIDENCE_CAPTURED,
    Stage.WIPE: Event.WIPE_DONE,
    Stage.REIMAGE: Event.REIMAGE_DONE,
    Stage.RESTORE: Event.RESTORE_DONE,
    Stage.VERIFY: Event.VERIFY_PASSED,
    Stage.RELEASE: Event.RELEASE_DONE,
}
START_EVENT: Mapping[Stage, Event] = {
    Stage.EVIDENCE: Event.CAPTURE_EVIDENCE,
    Stage.WIPE: Event.START_WIPE,
    Stage.REIMAGE: Event.START_REIMAGE,
    Stage.RESTORE: Event.START_RESTORE,
    Stage.VERIFY: Event.START_VERIFY,
    Stage.RELEASE: Event.START_RELEASE,
}
FAIL_EVENT: Mapping[Stage, Event] = {
    Stage.EVIDENCE: Event.EVIDENCE_FAILED,
    Stage.WIPE: Event.WIPE_FAILED,
    Stage.REIMAGE: Event.REIMAGE_FAILED,
    Stage.RESTORE: Event.RESTORE_FAILED,
    Stage.VERIFY: Event.VERIFY_FAILED,
    Stage.RELEASE: Event.RELEASE_FAILED,
}


@dataclass(frozen=True)
class PipelineSettings:
    lease_seconds: float = 300.0
    """Renewed before every stage; a stage must not take longer (drivers enforce their timeouts)."""
    attempts: int = 3
    """Attempts per stage before the host waits for an operator."""
    backoff_seconds: tuple[float, ...] = (1.0, 5.0, 15.0)
    slot_poll_seconds: float = 0.05

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelineSettings:
        return cls(lease_seconds=settings.lease_seconds, attempts=settings.stage_attempts)


@dataclass(frozen=True)
class HostOutcome:
    host: str
    state: HostState
    error: str | None = None
    stage: str | None = None
    not_started: bool = False
    """The executor never ran the pipeline: nothing was done, the host may be started again."""

    @property
    def online(self) -> bool:
        return self.state is HostState.ONLINE


class _Quarantined(Exception):
    """Verification found indicators of compromise: the host is isolated, the pipeline stops."""

    def __init__(self, state: HostState, detail: str) -> None:
        super().__init__(detail)
        self.state = state
        self.detail = detail


def next_stage(state: HostState, host: Host, has_evidence: bool) -> Stage | None:
    """The stage to run from a resting state; None when there is nothing for a run to do."""
    if state is HostState.COMPROMISED:
        return Stage.EVIDENCE if host.forensic_hold and not has_evidence else Stage.WIPE
    if state is HostState.EVIDENCE_CAPTURED:
        return Stage.WIPE
    if state is HostState.WIPED:
        return Stage.RESTORE if host.restore_method is RestoreMethod.BACKUP else Stage.REIMAGE
    if state is HostState.REIMAGED:
        return Stage.VERIFY
    if state is HostState.VERIFIED_CLEAN:
        return Stage.RELEASE
    return None


@dataclass
class HostPipeline:
    ledger: Ledger
    fleet: Fleet
    run_id: str
    actor: str
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    priority: Callable[[Host], int] = lambda host: 0
    sleep: Callable[[float], None] = time.sleep
    on_stage: Callable[[str, Stage | None, HostState], None] = lambda host, stage, state: None
    """Told of every state change (for progress); must be quick and must not raise."""

    def run(self, host: Host) -> HostOutcome:
        try:
            lease = self.ledger.acquire(host.name, self.run_id, self.settings.lease_seconds)
        except LeaseHeld as exc:
            return HostOutcome(host.name, self.ledger.host(host.name).state, str(exc))
        try:
            return self._drive(host, lease)
        except LeaseLost as exc:
            # Another run owns the host now: stop touching it, say so.
            return HostOutcome(host.name, self.ledger.host(host.name).state, str(exc))
        except LedgerError as exc:
            return HostOutcome(host.name, self.ledger.host(host.name).state, f"ledger refused: {exc}")
        finally:
            self.ledger.release(lease)

    def _drive(self, host: Host, lease: Lease) -> HostOutcome:
        state = lease.state
        if lease.interrupted_stage is not None:
            state = self._resolve_interrupted(host, lease, Stage(lease.interrupted_stage))
        failures: Counter[Stage] = Counter()
        last_error: dict[Stage, DriverError] = {}
        while True:
            if state is HostState.ONLINE:
                return HostOutcome(host.name, state)
            if state in FAILED:
                failed = FAILED_STAGE[state]
                error = last_error.get(failed)
                retryable = error is not None and error.retryable
                if not retryable or failures[failed] >= self.settings.attempts:
                    message = str(error) if error else f"{failed.value} failed before this run"
                    return HostOutcome(host.name, state, message, failed.value)
                self.sleep(self._backoff(failures[failed]))
                state = self._apply(lease, host, Event.RETRY, None, f"automatic retry {failures[failed]}")
                continue
            needs_evidence_check = state is HostState.COMPROMISED and host.forensic_hold
            has_evidence = needs_evidence_check and self.ledger.has_evidence(host.name)
            stage = next_stage(state, host, has_evidence)
            if stage is None:
                return HostOutcome(host.name, state, f"needs an operator: host is {state.value}")
            lease = self._fresh(lease)
            pools = host.pools.get(stage, ())
            with self.ledger.slots.hold(
                pools,
                host=host.name,
                run_id=self.run_id,
                stage=stage.value,
                priority=self.priority(host),
                seconds=self.settings.lease_seconds,
                poll=self.settings.slot_poll_seconds,
            ) as claims:
                state = self._apply(lease, host, START_EVENT[stage], stage)
                try:
                    with self._kept_alive(lease, claims):
                        state = self._perform(host, lease, stage)
                except _Quarantined as exc:
                    return HostOutcome(host.name, exc.state, exc.detail, stage.value)
                except DriverError as exc:
                    failures[stage] += 1
                    last_error[stage] = exc
                    state = self._apply(lease, host, FAIL_EVENT[stage], stage, error=exc.detail)

    def _perform(self, host: Host, lease: Lease, stage: Stage) -> HostState:
        if stage is Stage.EVIDENCE:
            evidence = self.fleet.capture_evidence(host)
            self.ledger.add_evidence(
                host.name, evidence.sha256, evidence.location, evidence.custodian, evidence.kind, self.run_id
            )
            return self._apply(lease, host, Event.EVIDENCE_CAPTURED, stage, f"sha256:{evidence.sha256}")
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
                state = self._apply(lease, host, Event.IOC_FOUND, stage, error=detail)
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
        return self._apply(lease, host, DONE_EVENT[stage], stage, detail)

    def _resolve_interrupted(self, host: Host, lease: Lease, stage: Stage) -> HostState:
        attempt = self.ledger.open_attempt(host.name)
        finished = (
            attempt is not None
            and stage is not Stage.VERIFY  # a verification's verdict is lost with its run: redo it
            and not (stage is Stage.EVIDENCE and not self.ledger.has_evidence(host.name))
            and self.fleet.stage_finished(host, stage, attempt.started_at)
        )
        if finished:
            return self._apply(
                lease,
                host,
                DONE_EVENT[stage],
                stage,
                "the run that started this stage was lost; the host's facts show it finished",
            )
        state = self._apply(
            lease,
            host,
            Event.INTERRUPTED,
            stage,
            error="the run that started this stage was lost and the host's facts do not show it finished",
        )
        if stage in DESTRUCTIVE_STAGES:
            # Repeating a disk-changing stage is an operator's call ('restore decide retry').
            return state
        return self._apply(
            lease, host, Event.RETRY, None, "non-destructive stage restarted after interruption"
        )

    def _apply(
        self,
        lease: Lease,
        host: Host,
        event: Event,
        stage: Stage | None,
        detail: str | None = None,
        *,
        error: str | None = None,
    ) -> HostState:
        state = self.ledger.apply(lease, event, actor=self.actor, detail=detail, error=error)
        self.on_stage(host.name, stage, state)
        return state

    @contextmanager
    def _kept_alive(self, lease: Lease, claims: Sequence[int]) -> Iterator[None]:
        """Renew the lease and the pool claims while a stage runs: a live install takes longer than a
        lease, and a lease that lapsed mid-stage would let another run take the host over."""
        stop = threading.Event()
        seconds = self.settings.lease_seconds

        def beat() -> None:
            while not stop.wait(seconds / 3):
                try:
                    self.ledger.renew(lease, seconds)
                    self.ledger.slots.renew(claims, seconds)
                except LeaseLost:
                    return  # taken over: the stage's next write is refused and the run stops there
                except Exception:  # a database hiccup: the next beat tries again, well within the lease
                    log.warning("%s: could not renew the lease", lease.host, exc_info=True)

        thread = threading.Thread(target=beat, name=f"lease-{lease.host}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _fresh(self, lease: Lease) -> Lease:
        """Renew the lease before a stage if less than half of it is left."""
        left = (lease.expires - self.ledger.now()).total_seconds()
        if left < self.settings.lease_seconds / 2:
            return self.ledger.renew(lease, self.settings.lease_seconds)
        return lease

    def _backoff(self, failures: int) -> float:
        delays = self.settings.backoff_seconds
        return delays[min(failures - 1, len(delays) - 1)] if delays else 0.0
