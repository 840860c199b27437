"""Read-only questions about the whole estate, for reports: one query each, never one per host.

The repository's readers answer about one host (``Ledger.history``); a situation report needs every
approval, every evidence record and the last word on each stuck host at once, and 1,700 histories
are 8,500 round trips. These read through the ledger's read-only engine (no write lock is taken or
waited for on SQLite) and hand out plain records, like the repository.

    from restore_flows.ledger import queries
    queries.approvals(ledger)          # every approval, with how many hosts it covers
    queries.evidence(ledger)           # every evidence record
    queries.last_transitions(ledger, ["gw-02"])   # the last transition of each named host
    queries.wave_stage_times(ledger)   # per wave: first stage start, last stage end
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Engine, Table, func, select

from restore_flows.ledger.records import ApprovalRecord, EvidenceRecord, TransitionRecord
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.tables import (
    ApprovalRow,
    ApprovedHostRow,
    AttemptRow,
    EvidenceRow,
    HostRow,
    RunRow,
    TransitionRow,
)
from restore_flows.states import HostState

HOSTS = cast(Table, HostRow.__table__)
RUNS = cast(Table, RunRow.__table__)
TRANSITIONS = cast(Table, TransitionRow.__table__)
ATTEMPTS = cast(Table, AttemptRow.__table__)
EVIDENCE = cast(Table, EvidenceRow.__table__)
APPROVALS = cast(Table, ApprovalRow.__table__)
APPROVED = cast(Table, ApprovedHostRow.__table__)

# SQLite takes a long IN list, but PostgreSQL plans one parameter per name: keep each batch modest.
_BATCH = 500


@dataclass(frozen=True, slots=True)
class ApprovalScope:
    """An approval as the crisis cell reads it: who, when, for what, and how much it covered."""

    approval: ApprovalRecord
    hosts: int
    """How many hosts it covers."""
    run_mode: str
    """'rehearsal' or 'live': the mode of the run it was given to."""


@dataclass(frozen=True, slots=True)
class WaveTimes:
    wave: str
    first_started: dt.datetime | None
    """When the first stage of one of its hosts started."""
    last_ended: dt.datetime | None
    """When the last finished stage of one of its hosts ended."""


def _reader(ledger: Ledger) -> Engine:
    # The repository's own read-only engine: these queries are the repository's, split out by
    # concern (STYLE: "repository split by concern"), so they share its connection handling.
    return ledger._reader


def approvals(ledger: Ledger) -> list[ApprovalScope]:
    """Every approval in the order given."""
    covered = (
        select(APPROVED.c.approval_id, func.count().label("hosts"))
        .group_by(APPROVED.c.approval_id)
        .subquery()
    )
    query = (
        select(APPROVALS, RUNS.c.mode, func.coalesce(covered.c.hosts, 0).label("hosts"))
        .join(RUNS, RUNS.c.id == APPROVALS.c.run_id)
        .outerjoin(covered, covered.c.approval_id == APPROVALS.c.id)
        .order_by(APPROVALS.c.approved_at, APPROVALS.c.id)
    )
    with _reader(ledger).connect() as db:
        return [
            ApprovalScope(
                ApprovalRecord(r.id, r.run_id, r.scope, r.approver, r.approved_at, r.shown, r.automatic),
                int(r.hosts),
                str(r.mode),
            )
            for r in db.execute(query)
        ]


def evidence(ledger: Ledger) -> list[EvidenceRecord]:
    """Every evidence record, in the order registered."""
    with _reader(ledger).connect() as db:
        return [
            EvidenceRecord(r.host, r.kind, r.sha256, r.location, r.custodian, r.recorded_at, r.run_id)
            for r in db.execute(select(EVIDENCE).order_by(EVIDENCE.c.recorded_at, EVIDENCE.c.id))
        ]


def last_transitions(ledger: Ledger, hosts: Iterable[str]) -> dict[str, TransitionRecord]:
    """The latest transition of each host named: for a stuck host, the error or the operator's reason
    that put it there (a failed stage's transition carries the driver's error in its detail)."""
    names = sorted(set(hosts))
    found: dict[str, TransitionRecord] = {}
    with _reader(ledger).connect() as db:
        for start in range(0, len(names), _BATCH):
            batch = names[start : start + _BATCH]
            latest = (
                select(func.max(TRANSITIONS.c.id))
                .where(TRANSITIONS.c.host.in_(batch))
                .group_by(TRANSITIONS.c.host)
                .scalar_subquery()
            )
            for r in db.execute(select(TRANSITIONS).where(TRANSITIONS.c.id.in_(latest))):
                found[r.host] = TransitionRecord(
                    id=r.id,
                    host=r.host,
                    from_state=HostState(r.from_state) if r.from_state else None,
                    event=r.event,
                    to_state=HostState(r.to_state),
                    run_id=r.run_id,
                    actor=r.actor,
                    at=r.at,
                    detail=r.detail,
                )
    return found


def wave_stage_times(ledger: Ledger) -> dict[str, WaveTimes]:
    """Per wave (as the ledger's hosts record it), when its first stage started and its last ended."""
    query = (
        select(HOSTS.c.wave, func.min(ATTEMPTS.c.started_at), func.max(ATTEMPTS.c.ended_at))
        .join(ATTEMPTS, ATTEMPTS.c.host == HOSTS.c.name)
        .where(HOSTS.c.retired_at.is_(None))
        .group_by(HOSTS.c.wave)
    )
    with _reader(ledger).connect() as db:
        rows = db.execute(query).all()
    return {str(r[0]): WaveTimes(str(r[0]), _utc(r[1]), _utc(r[2])) for r in rows}


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # min() and max() keep the column's UTC type; this is for a backend that hands back naive values.
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
