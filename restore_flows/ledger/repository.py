"""The ledger: the truth about every host. All safety rules are enforced here, not in callers.

Each public method is one database transaction. A state change is a single conditional UPDATE of the
host row that names the expected state and, for runs, the lease's fencing token and expiry; if another
writer got there first the UPDATE matches nothing and the change is refused. The transition log row,
the attempt row and the state change commit together or not at all.

Rules (see also docs/state-machine.md):

* a host under forensic hold cannot start wiping without an evidence record;
* a host that was verified clean cannot start wiping again until an operator sends ``recompromise``
  with a reason;
* a destructive event needs an approval recorded for the run that covers the host;
* a stage left running by a crashed run is reported on takeover (``Lease.interrupted_stage``); the
  table has no way to start it again until it is resolved (done after re-checking facts, or
  ``interrupted`` -> failed, for an operator).

There is deliberately no method that updates or deletes a transition.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql.dml import Update

from restore_flows.errors import LeaseHeld, LeaseLost, OrderWithdrawn, SafetyViolation, UnknownHost
from restore_flows.inventory.estate import Estate
from restore_flows.ledger.db import READ_ONLY, retried
from restore_flows.ledger.liveness import dead_here, dead_runs, this_process
from restore_flows.ledger.orders import StageOrders, still_taken
from restore_flows.ledger.pools import Slots
from restore_flows.ledger.records import (
    ApprovalRecord,
    AttemptRecord,
    EvidenceRecord,
    History,
    HostRecord,
    Lease,
    RunRecord,
    SyncReport,
    TransitionRecord,
)
from restore_flows.ledger.steps import Steps
from restore_flows.ledger.tables import (
    ApprovalRow,
    ApprovedHostRow,
    AttemptRow,
    EvidenceRow,
    HostRow,
    PoolClaimRow,
    RunRow,
    TransitionRow,
)
from restore_flows.planning import Plan
from restore_flows.states import (
    CLEAN,
    DESTRUCTIVE,
    INITIAL,
    NEEDS_REASON,
    OPERATOR_ONLY,
    OUTCOMES,
    STAGE_OF_STATE,
    START_STAGE,
    Event,
    HostState,
    advance,
)
from restore_flows.states import TRANSITIONS as TRANSITIONS_TABLE

Clock = Callable[[], dt.datetime]

HOSTS = cast(Table, HostRow.__table__)
RUNS = cast(Table, RunRow.__table__)
TRANSITIONS = cast(Table, TransitionRow.__table__)
ATTEMPTS = cast(Table, AttemptRow.__table__)
EVIDENCE = cast(Table, EvidenceRow.__table__)
CLAIMS = cast(Table, PoolClaimRow.__table__)
APPROVALS = cast(Table, ApprovalRow.__table__)
APPROVED = cast(Table, ApprovedHostRow.__table__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class _Change:
    host: str
    from_state: HostState
    to_state: HostState


class Ledger:
    """The repository over the ledger database. Safe to share between threads; one per process."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock = utcnow,
        stale_seconds: float = 30.0,
        executed_by: str | None = None,
    ) -> None:
        self._engine = engine
        self.executed_by = executed_by
        """The site worker this process is (its stage attempts record it); None: the run's own process."""
        self._reader = engine.execution_options(**READ_ONLY)
        self._clock = clock
        self.stale_seconds = stale_seconds
        """A run not heard from for this long is dead: its hosts and pool slots are taken over."""
        self.slots = Slots(engine, clock, stale_seconds)
        self.steps = Steps(engine, clock, stale_seconds)
        """Procedure steps (forest recovery, credential resets): their states, log and rotations."""
        self.orders = StageOrders(engine, clock, stale_seconds)
        """The site mode's stage orders, between the scheduler and each site's session."""
        # The state of each host this process holds a lease on, keyed by the lease's fencing token.
        # Only the holder of a token can change the host, so while the token is valid this is the
        # database's state; a write under a stale token fails its guard and takes the slow path.
        self._held: dict[tuple[str, str, int], HostState] = {}

    def now(self) -> dt.datetime:
        """The ledger's clock (leases and records are stamped with it)."""
        return self._clock()

    # -- inventory ---------------------------------------------------------------------------------

    @retried
    def sync_inventory(
        self, estate: Estate, the_plan: Plan, only: Collection[str] | None = None
    ) -> SyncReport:
        """Enroll new hosts (compromised), retire removed ones, refresh descriptive fields.

        Hosts are never deleted, and a rename is never guessed: a host that disappeared and a new
        one with the same site and role are reported as a possible rename, and stay two hosts.
        ``only``: enroll or refresh just these hosts and retire nothing (an operator's command on one
        host must not rewrite the ledger from whatever inventory it was given).
        """
        now = self._clock()
        with self._engine.begin() as db:
            existing = {
                row.name: row
                for row in db.execute(
                    select(
                        HOSTS.c.name,
                        HOSTS.c.site,
                        HOSTS.c.kind,
                        HOSTS.c.role,
                        HOSTS.c.department,
                        HOSTS.c.wave,
                        HOSTS.c.restore_method,
                        HOSTS.c.forensic_hold,
                        HOSTS.c.retired_at,
                    )
                )
            }
            wanted = {
                name: {
                    "site": host.site,
                    "kind": host.kind.value,
                    "role": host.role,
                    "department": host.department,
                    "wave": the_plan.hosts[name].wave,
                    "restore_method": host.restore_method.value,
                    "forensic_hold": host.forensic_hold,
                }
                for name, host in estate.hosts.items()
                if only is None or name in only
            }
            new = [name for name in wanted if name not in existing]
            if new:
                db.execute(
                    insert(HOSTS),
                    [
                        {
                            "name": name,
                            **wanted[name],
                            "state": INITIAL.value,
                            "clean": False,
                            "enrolled_at": now,
                            "updated_at": now,
                            "fence": 0,
                        }
                        for name in new
                    ],
                )
                db.execute(
                    insert(TRANSITIONS),
                    [
                        {
                            "host": name,
                            "from_state": None,
                            "event": Event.ENROLL.value,
                            "to_state": INITIAL.value,
                            "run_id": None,
                            "actor": "inventory",
                            "at": now,
                            "detail": "enrolled from the inventory",
                        }
                        for name in new
                    ],
                )
            gone = (
                []
                if only is not None
                else [n for n, row in existing.items() if n not in wanted and row.retired_at is None]
            )
            if gone:
                db.execute(update(HOSTS).where(HOSTS.c.name.in_(gone)).values(retired_at=now))
            back = [n for n in wanted if n in existing and existing[n].retired_at is not None]
            if back:
                db.execute(update(HOSTS).where(HOSTS.c.name.in_(back)).values(retired_at=None))
            changed = []
            for name, fields in wanted.items():
                row = existing.get(name)
                if row is not None and any(getattr(row, k) != v for k, v in fields.items()):
                    changed.append(name)
                    db.execute(update(HOSTS).where(HOSTS.c.name == name).values(**fields, updated_at=now))
        self.slots.sync({name: pool.capacity for name, pool in estate.pools.items()})
        if only is None:
            self.steps.sync(estate.procedures)
        renames = _possible_renames({n: existing[n] for n in gone}, {n: wanted[n] for n in new})
        return SyncReport(
            enrolled=tuple(new),
            retired=tuple(gone),
            returned=tuple(back),
            updated=tuple(changed),
            possible_renames=renames,
        )

    # -- runs, approvals, evidence -----------------------------------------------------------------

    @retried
    def start_run(self, mode: str, scope: str, actor: str, external_id: str | None = None) -> str:
        run_id = uuid.uuid4().hex
        now = self._clock()
        with self._engine.begin() as db:
            db.execute(
                insert(RUNS).values(
                    id=run_id,
                    mode=mode,
                    scope=scope,
                    actor=actor,
                    started_at=now,
                    external_id=external_id,
                    heartbeat_at=now,
                    process=this_process(),
                )
            )
        return run_id

    @retried
    def adopt_run(self, run_id: str) -> None:
        """This process now runs ``run_id`` (a flow run re-run after its process died): heartbeat and
        process are this one's, and the run is open again if a survivor had marked it dead."""
        with self._engine.begin() as db:
            db.execute(
                update(RUNS)
                .where(RUNS.c.id == run_id)
                .values(heartbeat_at=self._clock(), process=this_process(), ended_at=None, outcome=None)
            )

    @retried
    def run(self, run_id: str) -> RunRecord:
        with self._reader.connect() as db:
            row = db.execute(select(RUNS).where(RUNS.c.id == run_id)).first()
        if row is None:
            raise UnknownHost(f"no run {run_id!r} in the ledger")
        return self._run_record(row, self._clock())

    @retried
    def runs(self, *, open_only: bool = False) -> list[RunRecord]:
        query = select(RUNS).order_by(RUNS.c.started_at)
        if open_only:
            query = query.where(RUNS.c.ended_at.is_(None))
        now = self._clock()
        with self._reader.connect() as db:
            return [self._run_record(row, now) for row in db.execute(query)]

    @retried
    def first_run_at(self) -> dt.datetime | None:
        """When the ledger's first run started: a zero every run of this ledger shares."""
        with self._reader.connect() as db:
            first: dt.datetime | None = db.execute(select(func.min(RUNS.c.started_at))).scalar()
        return first.replace(tzinfo=dt.UTC) if first is not None and first.tzinfo is None else first

    def _run_record(self, row: Any, now: dt.datetime) -> RunRecord:
        heard = row.heartbeat_at or row.started_at
        alive = row.ended_at is None and heard > now - dt.timedelta(seconds=self.stale_seconds)
        return RunRecord(
            row.id,
            row.mode,
            row.scope,
            row.actor,
            row.started_at,
            row.ended_at,
            row.outcome,
            row.external_id,
            row.heartbeat_at,
            row.process,
            alive and not dead_here(row.process),
        )

    @retried
    def reap(self) -> list[RunRecord]:
        """Mark the runs that are gone as ended: 'crashed' (their process, on this machine, is no more)
        or 'lost' (not heard from within the staleness limit). Their hosts and slots are then free to be
        taken over; their late writes are refused by the fencing tokens. Returns the runs reaped."""
        now = self._clock()
        gone: list[RunRecord] = []
        with self._engine.begin() as db:
            for row in db.execute(select(RUNS).where(RUNS.c.ended_at.is_(None))).all():
                record = self._run_record(row, now)
                if record.alive:
                    continue
                outcome = "crashed" if dead_here(row.process) else "lost"
                db.execute(
                    update(RUNS)
                    .where(RUNS.c.id == row.id, RUNS.c.ended_at.is_(None))
                    .values(ended_at=now, outcome=outcome)
                )
                gone.append(record)
            # What ended runs still hold is given back: a run found dead when another took one of its
            # hosts over keeps the leases of its other hosts, and one killed after its last host came
            # online keeps that host's lease, which no later run asks for. Harmless to the fencing:
            # the dead run's late writes need its lease, and a host left mid-stage is still found
            # by its open attempt.
            ended = select(RUNS.c.id).where(RUNS.c.ended_at.is_not(None)).scalar_subquery()
            db.execute(
                update(HOSTS)
                .where(HOSTS.c.lease_run.in_(ended))
                .values(lease_run=None, lease_token=None, lease_expires=None)
            )
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.run_id.in_(ended), CLAIMS.c.released_at.is_(None))
                .values(released_at=now)
            )
        return gone

    @retried
    def run_for(self, external_id: str) -> str | None:
        """The ledger run of an orchestrator run (a Prefect flow run), if one was started: a flow run
        that is re-run after a crash continues its ledger run, with its approval and its leases."""
        with self._reader.connect() as db:
            found = db.execute(
                select(RUNS.c.id).where(RUNS.c.external_id == external_id).order_by(RUNS.c.started_at)
            ).first()
        return None if found is None else str(found.id)

    @retried
    def approved_hosts(self, run_id: str) -> set[str]:
        with self._reader.connect() as db:
            return {r.host for r in db.execute(select(APPROVED.c.host).where(APPROVED.c.run_id == run_id))}

    @retried
    def finish_run(self, run_id: str, outcome: str) -> None:
        """The run is over: its outcome recorded, its leases and pool claims given back."""
        now = self._clock()
        with self._engine.begin() as db:
            db.execute(update(RUNS).where(RUNS.c.id == run_id).values(ended_at=now, outcome=outcome))
            db.execute(
                update(HOSTS)
                .where(HOSTS.c.lease_run == run_id)
                .values(lease_run=None, lease_token=None, lease_expires=None)
            )
        self.slots.release_run(run_id)
        for key in [k for k in self._held if k[1] == run_id]:
            self._held.pop(key, None)

    @retried
    def heartbeat(self, run_id: str, seconds: float) -> None:
        """The run is alive: renew its heartbeat, every lease it holds and every pool claim it filed."""
        now = self._clock()
        expires = now + dt.timedelta(seconds=seconds)
        with self._engine.begin() as db:
            db.execute(update(RUNS).where(RUNS.c.id == run_id).values(heartbeat_at=now))
            db.execute(
                update(HOSTS)
                .where(HOSTS.c.lease_run == run_id, HOSTS.c.lease_expires > now)
                .values(lease_expires=expires)
            )
        self.slots.renew(run_id, seconds)

    @retried
    def record_approval(
        self,
        run_id: str,
        scope: str,
        hosts: Iterable[str],
        approver: str,
        shown: str,
        automatic: bool = False,
    ) -> int:
        """Record who approved destructive work on which hosts for one run, and what they saw."""
        if not approver.strip():
            raise SafetyViolation("an approval needs the approver's name")
        names = sorted(set(hosts))
        with self._engine.begin() as db:
            approval_id = db.execute(
                insert(APPROVALS)
                .values(
                    run_id=run_id,
                    scope=scope,
                    approver=approver.strip(),
                    approved_at=self._clock(),
                    shown=shown,
                    automatic=automatic,
                )
                .returning(APPROVALS.c.id)
            ).scalar_one()
            if names:
                db.execute(
                    insert(APPROVED),
                    [{"approval_id": approval_id, "host": n, "run_id": run_id} for n in names],
                )
        return int(approval_id)

    @retried
    def add_evidence(
        self,
        host: str,
        sha256: str,
        location: str,
        custodian: str,
        kind: str = "disk-image",
        run_id: str | None = None,
    ) -> EvidenceRecord:
        """Register evidence (by a capture driver or by the forensic team by hand).

        A host still ``compromised`` and not leased moves to ``evidence_captured`` with it: the
        forensic team's registration is what the run waits for.
        """
        digest = sha256.strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise SafetyViolation(f"'{sha256}' is not a SHA-256 digest (64 hexadecimal digits)")
        if not custodian.strip() or not location.strip():
            raise SafetyViolation("evidence needs a storage location and a custodian")
        now = self._clock()
        with self._engine.begin() as db:
            row = self._host_row(db, host)
            values = {
                "host": host,
                "kind": kind,
                "sha256": digest,
                "location": location,
                "custodian": custodian,
                "recorded_at": now,
                "run_id": run_id,
            }
            db.execute(insert(EVIDENCE).values(**values))
            leased = row.lease_run is not None and row.lease_expires > now
            if HostState(row.state) is HostState.COMPROMISED and not leased:
                self._change(
                    db,
                    host,
                    HostState.COMPROMISED,
                    Event.EVIDENCE_CAPTURED,
                    run_id=run_id,
                    actor=custodian,
                    detail=f"evidence {kind} sha256:{digest} at {location}",
                    now=now,
                    guard=_unleased(now),
                )
        return EvidenceRecord(host, kind, digest, location, custodian, now, run_id)

    # -- leases ------------------------------------------------------------------------------------

    @retried
    def acquire(
        self, host: str, run_id: str, seconds: float, *, order: tuple[int, str] | None = None
    ) -> Lease:
        """Take the host's lease for ``run_id``; raises ``LeaseHeld`` if another live run has it.

        An expired lease, or one held by a dead run, is taken over at once. If its run left a stage
        running, the lease says so. ``order`` (a site's stage order and the session running it): only
        while that session still has the order, else ``OrderWithdrawn``.
        """
        now = self._clock()
        expires = now + dt.timedelta(seconds=seconds)
        with self._engine.begin() as db:
            result = db.execute(_take_lease(host, run_id, now, expires, self.stale_seconds, order)).first()
            if result is None and order is not None and not db.execute(select(still_taken(*order))).scalar():
                raise OrderWithdrawn(
                    f"order {order[0]} of {host} is no longer session {order[1]}'s (taken back when that "
                    "session was taken for lost, and sent again): not started"
                )
            if result is None:
                row = self._host_row(db, host)
                if row.retired_at is not None:
                    raise UnknownHost(f"host {host} is retired (no longer in the inventory)")
                holder = db.execute(select(RUNS).where(RUNS.c.id == row.lease_run)).first()
                if holder is not None and dead_here(holder.process):
                    # Its process on this machine is gone: no need to wait for its heartbeat to go stale.
                    db.execute(
                        update(RUNS)
                        .where(RUNS.c.id == holder.id, RUNS.c.ended_at.is_(None))
                        .values(ended_at=now, outcome="crashed")
                    )
                    result = db.execute(
                        _take_lease(host, run_id, now, expires, self.stale_seconds, order)
                    ).first()
            if result is None:
                alive = "" if holder is None else f", alive (heard from at {_iso(holder.heartbeat_at)})"
                raise LeaseHeld(
                    f"host {host} is held by run {row.lease_run}{alive} until {_iso(row.lease_expires)}"
                )
            state = HostState(result.state)
        # A run works a host from one acquire to its release, so a stage found running at acquire
        # time was left by a lost worker: another run, or this same run before a crash and resume.
        interrupted = STAGE_OF_STATE.get(state)
        self._held[(host, run_id, int(result.lease_token))] = state
        return Lease(host, run_id, int(result.lease_token), expires, state, interrupted)

    @retried
    def renew(self, lease: Lease, seconds: float) -> Lease:
        now = self._clock()
        expires = now + dt.timedelta(seconds=seconds)
        with self._engine.begin() as db:
            done = db.execute(update(HOSTS).where(_holds(lease, now)).values(lease_expires=expires)).rowcount
            if done != 1:
                raise self._lost(db, lease)
        return Lease(lease.host, lease.run_id, lease.token, expires, lease.state, lease.interrupted_stage)

    def forget(self, lease: Lease) -> None:
        """This process no longer uses ``lease`` (it was lost, or is being taken afresh): what it
        remembered of the host under it goes; the database is not touched."""
        self._held.pop((lease.host, lease.run_id, lease.token), None)

    @retried
    def release(self, lease: Lease) -> None:
        """Give the lease back. Harmless if it was already lost."""
        self._held.pop((lease.host, lease.run_id, lease.token), None)
        with self._engine.begin() as db:
            db.execute(
                update(HOSTS)
                .where(
                    HOSTS.c.name == lease.host,
                    HOSTS.c.lease_run == lease.run_id,
                    HOSTS.c.lease_token == lease.token,
                )
                .values(lease_run=None, lease_token=None, lease_expires=None)
            )

    # -- state changes -----------------------------------------------------------------------------

    @retried
    def apply(
        self,
        lease: Lease,
        event: Event,
        *,
        actor: str,
        detail: str | None = None,
        error: str | None = None,
        release: Sequence[int] = (),
    ) -> HostState:
        """A run's event on a host it holds. Returns the new state.

        ``release``: pool claims the stage held, given back in the same transaction as the event that
        ends it (the slot is free exactly when the ledger says the stage is over)."""
        if event in OPERATOR_ONLY:
            raise SafetyViolation(f"'{event.value}' is an operator's decision, not a run's")
        now = self._clock()
        key = (lease.host, lease.run_id, lease.token)
        known = self._held.get(key)
        target = TRANSITIONS_TABLE.get((known, event)) if known is not None else None
        if event is Event.START_WIPE and known in CLEAN:
            target = None  # refused on the slow path, with the rule's own words
        with self._engine.begin() as db:
            if known is not None and target is not None:
                params = {
                    "host": lease.host,
                    "run": lease.run_id,
                    "token": lease.token,
                    "now": now,
                    "from_state": known.value,
                    "to_state": target.value,
                }
                if db.execute(_fast_update(event, target), params).rowcount == 1:
                    self._log(db, lease.host, known, event, target, lease.run_id, actor, detail, error, now)
                    self.slots.release_in(db, release, now)
                    self._held[key] = target
                    return target
            # The slow path: the first change in this process under this lease, or one the guarded
            # UPDATE refused; reading the row tells which rule or lease problem to report.
            self._held.pop(key, None)
            row = self._host_row(db, lease.host)
            if not (
                row.lease_run == lease.run_id
                and row.lease_token == lease.token
                and row.lease_expires is not None
                and row.lease_expires > now
            ):
                raise self._lost(db, lease)
            if TRANSITIONS_TABLE.get((HostState(row.state), event)) is None and self._applied_already(
                db, lease, event, HostState(row.state)
            ):
                # The commit of this very change was lost on the way back (a dropped connection):
                # the ledger has it, and running it again would be an illegal event.
                self._held[key] = HostState(row.state)
                return HostState(row.state)
            change = self._change(
                db,
                lease.host,
                HostState(row.state),
                event,
                run_id=lease.run_id,
                actor=actor,
                detail=detail,
                error=error,
                now=now,
                guard=_holds(lease, now),
                host_row=row,
            )
            self.slots.release_in(db, release, now)
        self._held[key] = change.to_state
        return change.to_state

    @retried
    def resume(self, lease: Lease, *, actor: str, error: str, detail: str) -> HostState:
        """A stage a lost run left running, which the host's facts do not show finished: recorded as
        interrupted and retried in one transaction. Returns the state the stage starts from again.

        As two transactions, a crash between them (of the run taking over, killed in its turn) left
        the host in the stage's failed state, which only an operator may retry, although the run had
        decided to start the stage again: the next run then stopped there."""
        now = self._clock()
        key = (lease.host, lease.run_id, lease.token)
        self._held.pop(key, None)
        with self._engine.begin() as db:
            row = self._host_row(db, lease.host)
            if not (
                row.lease_run == lease.run_id
                and row.lease_token == lease.token
                and row.lease_expires is not None
                and row.lease_expires > now
            ):
                raise self._lost(db, lease)
            state = HostState(row.state)
            if state not in STAGE_OF_STATE and self._applied_already(db, lease, Event.RETRY, state):
                # The commit of this very resume was lost on the way back (a dropped connection).
                self._held[key] = state
                return state
            guard = _holds(lease, now)
            failed = self._change(
                db,
                lease.host,
                state,
                Event.INTERRUPTED,
                run_id=lease.run_id,
                actor=actor,
                detail=None,
                error=error,
                now=now,
                guard=guard,
                host_row=row,
            )
            change = self._change(
                db,
                lease.host,
                failed.to_state,
                Event.RETRY,
                run_id=lease.run_id,
                actor=actor,
                detail=detail,
                now=now,
                guard=guard,
            )
        self._held[key] = change.to_state
        return change.to_state

    @retried
    def operator_event(self, host: str, event: Event, *, actor: str, reason: str | None) -> HostState:
        """An operator's decision (retry, skip, hold, release_hold, recompromise) on a host no run holds."""
        if not actor.strip():
            raise SafetyViolation("an operator's event must name the operator")
        if event in NEEDS_REASON and not (reason and reason.strip()):
            raise SafetyViolation(f"'{event.value}' needs a reason")
        now = self._clock()
        with self._engine.begin() as db:
            row = self._host_row(db, host)
            if row.lease_run is not None and row.lease_expires > now:
                raise LeaseHeld(
                    f"host {host} is held by run {row.lease_run} until {_iso(row.lease_expires)}; "
                    "stop that run or wait for its lease to expire"
                )
            change = self._change(
                db,
                host,
                HostState(row.state),
                event,
                run_id=None,
                actor=actor.strip(),
                detail=reason,
                now=now,
                guard=_unleased(now),
                host_row=row,
            )
        return change.to_state

    def _change(
        self,
        db: Connection,
        host: str,
        state: HostState,
        event: Event,
        *,
        run_id: str | None,
        actor: str,
        detail: str | None,
        now: dt.datetime,
        guard: Any,
        error: str | None = None,
        host_row: Any = None,
    ) -> _Change:
        target = advance(state, event)
        row = host_row if host_row is not None else self._host_row(db, host)
        self._check_rules(db, row, event, run_id)
        values: dict[str, Any] = {"state": target.value, "updated_at": now}
        if target is HostState.VERIFIED_CLEAN:
            values["clean"] = True
        elif event is Event.RECOMPROMISE:
            values["clean"] = False
        done = db.execute(
            update(HOSTS).where(HOSTS.c.name == host, HOSTS.c.state == state.value, guard).values(**values)
        ).rowcount
        if done != 1:
            raise LeaseLost(
                f"host {host} changed under this writer (expected state {state.value}); nothing recorded"
            )
        self._log(db, host, state, event, target, run_id, actor, detail, error, now)
        return _Change(host, state, target)

    def _log(
        self,
        db: Connection,
        host: str,
        state: HostState,
        event: Event,
        target: HostState,
        run_id: str | None,
        actor: str,
        detail: str | None,
        error: str | None,
        now: dt.datetime,
    ) -> None:
        """The transition log row and the attempt it opens or closes, in the state change's transaction."""
        db.execute(
            _LOG_TRANSITION,
            {
                "host": host,
                "from_state": state.value,
                "event": event.value,
                "to_state": target.value,
                "run_id": run_id,
                "actor": actor,
                "at": now,
                "detail": detail if error is None else f"{detail + ': ' if detail else ''}{error}",
            },
        )
        if event in START_STAGE:
            db.execute(
                _OPEN_ATTEMPT,
                {
                    "b_host": host,
                    "b_stage": START_STAGE[event].value,
                    "b_run_id": run_id,
                    "b_now": now,
                    "b_by": self.executed_by,
                },
            )
        elif event in OUTCOMES and state in STAGE_OF_STATE:
            db.execute(
                _CLOSE_ATTEMPT,
                {
                    "b_host": host,
                    "b_stage": STAGE_OF_STATE[state],
                    "b_now": now,
                    "b_outcome": OUTCOMES[event],
                    "b_error": error,
                },
            )

    def _check_rules(self, db: Connection, row: Any, event: Event, run_id: str | None) -> None:
        host = row.name
        if event is Event.START_WIPE:
            if row.clean or HostState(row.state) in CLEAN:
                raise SafetyViolation(
                    f"host {host} was verified clean: it is never wiped again unless an operator "
                    "sends 'recompromise' with a reason"
                )
            if row.forensic_hold and not self._has_evidence(db, host):
                raise SafetyViolation(
                    f"host {host} is under forensic hold and has no evidence record: capture or "
                    "register evidence before wiping"
                )
        if event is Event.EVIDENCE_CAPTURED and not self._has_evidence(db, host):
            raise SafetyViolation(f"host {host}: 'evidence_captured' needs an evidence record")
        if event in DESTRUCTIVE:
            approved = (
                run_id is not None
                and db.execute(
                    select(APPROVED.c.approval_id).where(APPROVED.c.run_id == run_id, APPROVED.c.host == host)
                ).first()
                is not None
            )
            if not approved:
                raise SafetyViolation(
                    f"'{event.value}' on {host} needs an approval recorded for run {run_id} "
                    "that covers this host"
                )

    # -- reading -----------------------------------------------------------------------------------

    @retried
    def host(self, name: str) -> HostRecord:
        with self._reader.connect() as db:
            return _host_record(self._host_row(db, name))

    @retried
    def hosts(self, include_retired: bool = False) -> list[HostRecord]:
        query = select(HOSTS).order_by(HOSTS.c.name)
        if not include_retired:
            query = query.where(HOSTS.c.retired_at.is_(None))
        with self._reader.connect() as db:
            return [_host_record(row) for row in db.execute(query)]

    @retried
    def states(self, names: Iterable[str] | None = None) -> dict[str, HostState]:
        query = select(HOSTS.c.name, HOSTS.c.state)
        if names is not None:
            query = query.where(HOSTS.c.name.in_(list(names)))
        with self._reader.connect() as db:
            return {row.name: HostState(row.state) for row in db.execute(query)}

    @retried
    def history(self, name: str) -> History:
        with self._reader.connect() as db:
            host = _host_record(self._host_row(db, name))
            transitions = tuple(
                TransitionRecord(
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
                for r in db.execute(
                    select(TRANSITIONS).where(TRANSITIONS.c.host == name).order_by(TRANSITIONS.c.id)
                )
            )
            attempts = tuple(
                AttemptRecord(
                    r.host,
                    r.stage,
                    r.number,
                    r.run_id,
                    r.started_at,
                    r.ended_at,
                    r.outcome,
                    r.error,
                    r.executed_by,
                )
                for r in db.execute(select(ATTEMPTS).where(ATTEMPTS.c.host == name).order_by(ATTEMPTS.c.id))
            )
            evidence = tuple(
                EvidenceRecord(r.host, r.kind, r.sha256, r.location, r.custodian, r.recorded_at, r.run_id)
                for r in db.execute(select(EVIDENCE).where(EVIDENCE.c.host == name).order_by(EVIDENCE.c.id))
            )
            approvals = tuple(
                ApprovalRecord(r.id, r.run_id, r.scope, r.approver, r.approved_at, r.shown, r.automatic)
                for r in db.execute(
                    select(APPROVALS)
                    .join(APPROVED, APPROVED.c.approval_id == APPROVALS.c.id)
                    .where(APPROVED.c.host == name)
                    .order_by(APPROVALS.c.id)
                )
            )
        return History(host, transitions, attempts, evidence, approvals)

    @retried
    def attempt_count(self, host: str, stage: str) -> int:
        """How many attempts of this stage the host has had, in any run."""
        with self._reader.connect() as db:
            query = select(func.count()).where(ATTEMPTS.c.host == host, ATTEMPTS.c.stage == stage)
            return int(db.execute(query).scalar_one())

    @retried
    def interrupted(self) -> list[tuple[str, str]]:
        """(host, stage) of hosts left mid-stage with no live lease: resume must resolve them."""
        now = self._clock()
        query = (
            select(HOSTS.c.name, ATTEMPTS.c.stage)
            .join(ATTEMPTS, and_(ATTEMPTS.c.host == HOSTS.c.name, ATTEMPTS.c.ended_at.is_(None)))
            .where(
                HOSTS.c.state.in_([s.value for s in STAGE_OF_STATE]),
                or_(HOSTS.c.lease_run.is_(None), HOSTS.c.lease_expires <= now),
            )
            .order_by(HOSTS.c.name)
        )
        with self._reader.connect() as db:
            return [(row.name, row.stage) for row in db.execute(query)]

    @retried
    def finished_attempts(self) -> list[tuple[str, str, float]]:
        """(host, stage, seconds) of every stage attempt that succeeded: how fast work really goes."""
        with self._reader.connect() as db:
            rows = db.execute(
                select(ATTEMPTS.c.host, ATTEMPTS.c.stage, ATTEMPTS.c.started_at, ATTEMPTS.c.ended_at).where(
                    ATTEMPTS.c.outcome == "succeeded", ATTEMPTS.c.ended_at.is_not(None)
                )
            ).all()
        return [(r.host, r.stage, (r.ended_at - r.started_at).total_seconds()) for r in rows]

    @retried
    def back_online(self) -> tuple[dt.datetime | None, dict[str, dt.datetime]]:
        """When the first stage of the ledger started, and when each host last came online."""
        with self._reader.connect() as db:
            first = db.execute(select(func.min(ATTEMPTS.c.started_at))).scalar_one()
            rows = db.execute(
                select(TRANSITIONS.c.host, func.max(TRANSITIONS.c.at))
                .where(TRANSITIONS.c.event == Event.RELEASE_DONE.value)
                .group_by(TRANSITIONS.c.host)
            ).all()
        started = first.replace(tzinfo=dt.UTC) if first is not None and first.tzinfo is None else first
        return started, {
            str(r[0]): (r[1].replace(tzinfo=dt.UTC) if r[1].tzinfo is None else r[1]) for r in rows
        }

    @retried
    def with_evidence(self) -> set[str]:
        """Hosts that have at least one evidence record."""
        with self._reader.connect() as db:
            return {str(r[0]) for r in db.execute(select(EVIDENCE.c.host).distinct())}

    @retried
    def running_stages(self) -> dict[str, tuple[str, str | None, dt.datetime]]:
        """Hosts with a stage running (no end recorded): host -> (stage, run, started at)."""
        with self._reader.connect() as db:
            rows = db.execute(
                select(ATTEMPTS.c.host, ATTEMPTS.c.stage, ATTEMPTS.c.run_id, ATTEMPTS.c.started_at).where(
                    ATTEMPTS.c.ended_at.is_(None)
                )
            ).all()
        return {str(r.host): (str(r.stage), r.run_id, r.started_at) for r in rows}

    @retried
    def leases(self) -> dict[str, tuple[str, dt.datetime]]:
        """Hosts leased by a run: host -> (run, lease expiry)."""
        with self._reader.connect() as db:
            rows = db.execute(
                select(HOSTS.c.name, HOSTS.c.lease_run, HOSTS.c.lease_expires).where(
                    HOSTS.c.lease_run.is_not(None)
                )
            ).all()
        return {str(r.name): (str(r.lease_run), r.lease_expires) for r in rows}

    @retried
    def has_evidence(self, host: str) -> bool:
        with self._reader.connect() as db:
            return self._has_evidence(db, host)

    @retried
    def open_attempt(self, host: str) -> AttemptRecord | None:
        """The attempt of a stage that started and has not ended (after a crash: the interrupted one)."""
        with self._reader.connect() as db:
            r = db.execute(
                select(ATTEMPTS)
                .where(ATTEMPTS.c.host == host, ATTEMPTS.c.ended_at.is_(None))
                .order_by(ATTEMPTS.c.id.desc())
                .limit(1)
            ).first()
        if r is None:
            return None
        return AttemptRecord(
            r.host, r.stage, r.number, r.run_id, r.started_at, r.ended_at, r.outcome, r.error, r.executed_by
        )

    @retried
    def transition_count(self) -> int:
        with self._reader.connect() as db:
            return int(db.execute(select(func.count()).select_from(TRANSITIONS)).scalar_one())

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _host_row(db: Connection, name: str) -> Any:
        row = db.execute(select(HOSTS).where(HOSTS.c.name == name)).first()
        if row is None:
            raise UnknownHost(f"no host named {name!r} in the ledger (is it in the inventory?)")
        return row

    @staticmethod
    def _applied_already(db: Connection, lease: Lease, event: Event, state: HostState) -> bool:
        last = db.execute(
            select(TRANSITIONS.c.event, TRANSITIONS.c.run_id, TRANSITIONS.c.to_state)
            .where(TRANSITIONS.c.host == lease.host)
            .order_by(TRANSITIONS.c.id.desc())
            .limit(1)
        ).first()
        return (
            last is not None
            and last.event == event.value
            and last.run_id == lease.run_id
            and last.to_state == state.value
        )

    @staticmethod
    def _has_evidence(db: Connection, host: str) -> bool:
        return db.execute(select(EVIDENCE.c.id).where(EVIDENCE.c.host == host).limit(1)).first() is not None

    def _lost(self, db: Connection, lease: Lease) -> LeaseLost:
        row = self._host_row(db, lease.host)
        if row.lease_run != lease.run_id or row.lease_token != lease.token:
            holder = row.lease_run or "nobody"
            return LeaseLost(
                f"run {lease.run_id} lost its lease on {lease.host} (token {lease.token}; now held "
                f"by {holder} with token {row.lease_token}): nothing recorded"
            )
        return LeaseLost(
            f"run {lease.run_id}'s lease on {lease.host} expired at {_iso(row.lease_expires)}: "
            "nothing recorded"
        )


# Statements on the hot path, built once: building SQLAlchemy constructs per call cost more than the
# database work itself. Values are bound per call.
_LOG_TRANSITION = insert(TRANSITIONS)
# One statement: the next attempt number is computed in the INSERT (an aggregate without GROUP BY
# always yields one row), so opening an attempt is a single round trip.
_OPEN_ATTEMPT = insert(ATTEMPTS).from_select(
    ["host", "stage", "number", "run_id", "started_at", "outcome", "executed_by"],
    select(
        bindparam("b_host", type_=ATTEMPTS.c.host.type),
        bindparam("b_stage", type_=ATTEMPTS.c.stage.type),
        func.coalesce(func.max(ATTEMPTS.c.number), 0) + 1,
        bindparam("b_run_id", type_=ATTEMPTS.c.run_id.type),
        bindparam("b_now", type_=ATTEMPTS.c.started_at.type),
        literal("running", type_=ATTEMPTS.c.outcome.type),
        bindparam("b_by", type_=ATTEMPTS.c.executed_by.type),
    ).where(ATTEMPTS.c.host == bindparam("b_host"), ATTEMPTS.c.stage == bindparam("b_stage")),
)
_CLOSE_ATTEMPT = (
    update(ATTEMPTS)
    .where(
        ATTEMPTS.c.host == bindparam("b_host"),
        ATTEMPTS.c.stage == bindparam("b_stage"),
        ATTEMPTS.c.ended_at.is_(None),
    )
    .values(
        ended_at=bindparam("b_now", type_=ATTEMPTS.c.ended_at.type),
        outcome=bindparam("b_outcome"),
        error=bindparam("b_error"),
    )
)
_FAST_UPDATES: dict[tuple[Event, bool], Update] = {}


def _fast_update(event: Event, target: HostState) -> Update:
    """A run's state change as one guarded UPDATE: the lease, the expected state and the event's safety
    rules are all in its WHERE clause, so nothing needs to be read first. It matches no row when
    anything is wrong; the caller then reads the row to say what."""
    key = (event, target is HostState.VERIFIED_CLEAN)
    statement = _FAST_UPDATES.get(key)
    if statement is not None:
        return statement
    host = HOSTS.c.name == bindparam("host")
    rules: list[Any] = [
        host,
        HOSTS.c.state == bindparam("from_state"),
        HOSTS.c.lease_run == bindparam("run"),
        HOSTS.c.lease_token == bindparam("token"),
        HOSTS.c.lease_expires > bindparam("now"),
    ]
    has_evidence = exists().where(EVIDENCE.c.host == HOSTS.c.name)
    if event is Event.START_WIPE:
        rules += [HOSTS.c.clean == false(), or_(HOSTS.c.forensic_hold == false(), has_evidence)]
    if event is Event.EVIDENCE_CAPTURED:
        rules.append(has_evidence)
    if event in DESTRUCTIVE:
        rules.append(exists().where(APPROVED.c.run_id == bindparam("run"), APPROVED.c.host == HOSTS.c.name))
    values: dict[str, Any] = {"state": bindparam("to_state"), "updated_at": bindparam("now")}
    if target is HostState.VERIFIED_CLEAN:
        values["clean"] = True
    statement = update(HOSTS).where(*rules).values(**values)
    _FAST_UPDATES[key] = statement
    return statement


def _take_lease(
    host: str,
    run_id: str,
    now: dt.datetime,
    expires: dt.datetime,
    stale: float,
    order: tuple[int, str] | None = None,
) -> Any:
    """Take a host's lease if nobody alive holds it: a new fencing token refuses the old holder (this
    same run's too: another of its site sessions, or itself before a crash)."""
    return (
        update(HOSTS)
        .where(
            HOSTS.c.name == host,
            HOSTS.c.retired_at.is_(None),
            or_(
                HOSTS.c.lease_run.is_(None),
                HOSTS.c.lease_expires <= now,
                HOSTS.c.lease_run == run_id,
                HOSTS.c.lease_run.in_(dead_runs(now, stale)),
            ),
            true() if order is None else still_taken(*order),
        )
        .values(
            fence=HOSTS.c.fence + 1,
            lease_token=HOSTS.c.fence + 1,
            lease_run=run_id,
            lease_expires=expires,
        )
        .returning(HOSTS.c.lease_token, HOSTS.c.state)
    )


def _holds(lease: Lease, now: dt.datetime) -> Any:
    return and_(
        HOSTS.c.name == lease.host,
        HOSTS.c.lease_run == lease.run_id,
        HOSTS.c.lease_token == lease.token,
        HOSTS.c.lease_expires > now,
    )


def _unleased(now: dt.datetime) -> Any:
    return or_(HOSTS.c.lease_run.is_(None), HOSTS.c.lease_expires <= now)


def _host_record(row: Any) -> HostRecord:
    return HostRecord(
        name=row.name,
        site=row.site,
        kind=row.kind,
        role=row.role,
        department=row.department,
        wave=row.wave,
        restore_method=row.restore_method,
        forensic_hold=row.forensic_hold,
        state=HostState(row.state),
        clean=row.clean,
        retired=row.retired_at is not None,
        lease_run=row.lease_run,
        lease_expires=row.lease_expires,
    )


def _possible_renames(
    gone: Mapping[str, Any], new: Mapping[str, Mapping[str, Any]]
) -> tuple[tuple[str, str], ...]:
    """Pairs (old, new) that share site, role and kind and are the only such pair."""

    def key(site: str, role: str, kind: str) -> tuple[str, str, str]:
        return (site, role, kind)

    gone_by = Counter(key(r.site, r.role, r.kind) for r in gone.values())
    new_by = Counter(key(f["site"], f["role"], f["kind"]) for f in new.values())
    pairs = []
    for old_name, row in gone.items():
        k = key(row.site, row.role, row.kind)
        if gone_by[k] == 1 and new_by[k] == 1:
            new_name = next(n for n, f in new.items() if key(f["site"], f["role"], f["kind"]) == k)
            pairs.append((old_name, new_name))
    return tuple(sorted(pairs))


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat().replace("+00:00", "Z") if value is not None else "-"
