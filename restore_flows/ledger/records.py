"""What the ledger hands out: plain frozen records, never ORM rows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from restore_flows.states import HostState, StepState


@dataclass(frozen=True, slots=True)
class Lease:
    """Permission for one run to act on one host until ``expires``.

    Every write presents ``token``; a newer lease on the host has a larger token, so a run that lost
    its lease (paused, partitioned, crashed and back) is refused instead of overwriting.
    """

    host: str
    run_id: str
    token: int
    expires: dt.datetime
    state: HostState
    """The host's state when the lease was taken."""
    interrupted_stage: str | None = None
    """Set when the host was left mid-stage by a run that is gone: resume must resolve it."""


@dataclass(frozen=True, slots=True)
class HostRecord:
    name: str
    site: str
    kind: str
    role: str
    department: str
    wave: str
    restore_method: str
    forensic_hold: bool
    state: HostState
    clean: bool
    retired: bool
    lease_run: str | None
    lease_expires: dt.datetime | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    mode: str
    scope: str
    actor: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    outcome: str | None
    external_id: str | None
    heartbeat_at: dt.datetime | None
    process: str | None
    alive: bool
    """Not ended, and heard from within the ledger's staleness limit."""


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    id: int
    host: str
    from_state: HostState | None
    event: str
    to_state: HostState
    run_id: str | None
    actor: str
    at: dt.datetime
    detail: str | None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    host: str
    stage: str
    number: int
    run_id: str | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    outcome: str
    error: str | None
    executed_by: str | None = None
    """The site worker that ran it; None when the run's own process did."""


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    host: str
    kind: str
    sha256: str
    location: str
    custodian: str
    recorded_at: dt.datetime
    run_id: str | None


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    id: int
    run_id: str
    scope: str
    approver: str
    approved_at: dt.datetime
    shown: str
    automatic: bool


@dataclass(frozen=True, slots=True)
class History:
    host: HostRecord
    transitions: tuple[TransitionRecord, ...]
    attempts: tuple[AttemptRecord, ...]
    evidence: tuple[EvidenceRecord, ...]
    approvals: tuple[ApprovalRecord, ...]


@dataclass(frozen=True, slots=True)
class SyncReport:
    enrolled: tuple[str, ...] = ()
    retired: tuple[str, ...] = ()
    returned: tuple[str, ...] = ()
    """Retired hosts that are back in the inventory."""
    updated: tuple[str, ...] = ()
    possible_renames: tuple[tuple[str, str], ...] = ()
    """(old, new) pairs that look like a rename; reported, never merged."""
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class StepRecord:
    name: str
    state: StepState
    attempts: int
    run_id: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    """When it was last done."""
    error: str | None
    retired: bool = False


@dataclass(frozen=True, slots=True)
class StepLogRecord:
    id: int
    step: str
    from_state: StepState | None
    event: str
    to_state: StepState
    attempt: int
    run_id: str | None
    actor: str
    at: dt.datetime
    output_sha256: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class RotationRecord:
    step: str
    secret: str
    fingerprint: str
    run_id: str
    actor: str
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class StepHistory:
    step: StepRecord
    log: tuple[StepLogRecord, ...]
    rotations: tuple[RotationRecord, ...]
    approvals: tuple[ApprovalRecord, ...]
