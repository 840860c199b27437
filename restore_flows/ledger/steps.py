"""Procedure steps in the ledger: their state, their append-only log, the secrets they rotated.

A credential reset is not idempotent, so the rules are about never running one twice by accident:

* a step starts only from ``pending``, by one conditional UPDATE naming the run: two runs racing for
  it cannot both start it;
* a step that needs a named approval starts only if one is recorded for the run (scope ``step:NAME``);
* a step left ``running`` by a run that is gone may have run: it becomes ``interrupted``, and only an
  operator re-arms it (``rearm``, with a reason), unless the inventory declares it ``repeatable``;
* a step that ran and failed waits for an operator likewise; one whose command never reached its
  target (``not_started``) is pending again;
* a secret the step rotated is recorded by name and fingerprint only.

Every state change and its log row (and rotations) commit together. See ``docs/state-machine.md``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, insert, select, update

from restore_flows.errors import LeaseHeld, LeaseLost, LedgerError, SafetyViolation
from restore_flows.ledger.db import READ_ONLY, retried
from restore_flows.ledger.liveness import dead_here, dead_runs
from restore_flows.ledger.records import (
    ApprovalRecord,
    RotationRecord,
    StepHistory,
    StepLogRecord,
    StepRecord,
)
from restore_flows.ledger.tables import ApprovalRow, RunRow, SecretRotationRow, StepLogRow, StepRow
from restore_flows.states import (
    STEP_INITIAL,
    STEP_OPERATOR_EVENTS,
    StepEvent,
    StepState,
    advance_step,
)

STEPS = cast(Table, StepRow.__table__)
LOG = cast(Table, StepLogRow.__table__)
ROTATIONS = cast(Table, SecretRotationRow.__table__)
APPROVALS = cast(Table, ApprovalRow.__table__)
RUNS = cast(Table, RunRow.__table__)


class UnknownStep(LedgerError):
    pass


def approval_scope(step: str) -> str:
    """How an approval of a step is recorded (a wave's scope is its name)."""
    return f"step:{step}"


class Begun(StrEnum):
    STARTED = "started"
    """This run may run it now (attempt ``attempt``)."""
    DONE = "done"
    """It was done already: nothing to do."""
    HELD = "held"
    """Another run, alive, is running it: wait for it."""
    STUCK = "stuck"
    """Failed or interrupted: an operator decides (``why``)."""


@dataclass(frozen=True, slots=True)
class Begin:
    outcome: Begun
    state: StepState
    attempt: int = 0
    held_by: str | None = None
    why: str | None = None


class Steps:
    """The repository of procedure steps; one per ledger, safe to share between threads."""

    def __init__(self, engine: Engine, clock: Callable[[], dt.datetime], stale_seconds: float) -> None:
        self._engine = engine
        self._reader = engine.execution_options(**READ_ONLY)
        self._clock = clock
        self._stale = stale_seconds

    @retried
    def sync(self, names: Iterable[str]) -> tuple[str, ...]:
        """Enroll the inventory's new steps (pending); a step no longer listed is retired, never
        deleted (what it did stays on record). Returns the steps enrolled."""
        wanted = list(dict.fromkeys(names))
        now = self._clock()
        with self._engine.begin() as db:
            existing = {r.name: r.retired_at for r in db.execute(select(STEPS.c.name, STEPS.c.retired_at))}
            new = [n for n in wanted if n not in existing]
            if new:
                db.execute(
                    insert(STEPS),
                    [
                        {
                            "name": n,
                            "state": STEP_INITIAL.value,
                            "attempts": 0,
                            "enrolled_at": now,
                            "updated_at": now,
                        }
                        for n in new
                    ],
                )
                db.execute(
                    insert(LOG),
                    [
                        {
                            "step": n,
                            "from_state": None,
                            "event": "enroll",
                            "to_state": STEP_INITIAL.value,
                            "attempt": 0,
                            "run_id": None,
                            "actor": "inventory",
                            "at": now,
                            "detail": "enrolled from the inventory",
                        }
                        for n in new
                    ],
                )
            gone = [n for n, retired in existing.items() if n not in wanted and retired is None]
            if gone:
                db.execute(update(STEPS).where(STEPS.c.name.in_(gone)).values(retired_at=now))
            back = [n for n in wanted if n in existing and existing[n] is not None]
            if back:
                db.execute(update(STEPS).where(STEPS.c.name.in_(back)).values(retired_at=None))
        return tuple(new)

    @retried
    def states(self) -> dict[str, StepRecord]:
        with self._reader.connect() as db:
            return {r.name: _record(r) for r in db.execute(select(STEPS))}

    @retried
    def step(self, name: str) -> StepRecord:
        with self._reader.connect() as db:
            return _record(_row(db, name))

    @retried
    def begin(self, name: str, run_id: str, actor: str, *, repeatable: bool, needs_approval: bool) -> Begin:
        """Start the step for ``run_id`` if it may start; else say why not."""
        now = self._clock()
        with self._engine.begin() as db:
            row = _row(db, name)
            state = StepState(row.state)
            if state is StepState.RUNNING:
                if row.run_id == run_id:
                    # This run started it before its process died and came back (a flow run re-run):
                    # it may have run all the same.
                    state = self._change(
                        db, row, StepEvent.INTERRUPT, run_id, actor, now, "its run was restarted"
                    )
                elif self._alive(db, row.run_id, now):
                    return Begin(Begun.HELD, state, held_by=row.run_id)
                else:
                    state = self._change(
                        db, row, StepEvent.INTERRUPT, None, actor, now, f"run {row.run_id} is gone"
                    )
                row = _row(db, name)
            if state is StepState.DONE:
                return Begin(Begun.DONE, state)
            if state in (StepState.FAILED, StepState.INTERRUPTED):
                if not repeatable:
                    return Begin(
                        Begun.STUCK,
                        state,
                        why=f"step {name} is {state.value}: it may have run; an operator re-arms it "
                        f"('restore decide rearm {name} --actor NAME --reason R') or records it done by hand",
                    )
                self._change(db, row, StepEvent.RETRY, run_id, actor, now, "repeatable: run again")
                row = _row(db, name)
            if needs_approval and not self._approved(db, name, run_id):
                raise SafetyViolation(
                    f"step {name} needs a named approval recorded for run {run_id} before it starts"
                )
            attempt = int(row.attempts) + 1
            done = db.execute(
                update(STEPS)
                .where(STEPS.c.name == name, STEPS.c.state == StepState.PENDING.value)
                .values(
                    state=StepState.RUNNING.value,
                    run_id=run_id,
                    attempts=attempt,
                    started_at=now,
                    error=None,
                    updated_at=now,
                )
            ).rowcount
            if done != 1:
                raise LeaseLost(f"step {name} changed under this run; nothing recorded")
            _log(db, name, StepState.PENDING, StepEvent.START, StepState.RUNNING, attempt, run_id, actor, now)
        return Begin(Begun.STARTED, StepState.RUNNING, attempt=attempt)

    @retried
    def finish(
        self,
        name: str,
        run_id: str,
        actor: str,
        event: StepEvent,
        *,
        output_sha256: str | None = None,
        detail: str | None = None,
        rotations: Sequence[tuple[str, str]] = (),
    ) -> StepState:
        """End the attempt this run started: ``succeed``, ``fail`` or ``not_started``; with the
        secrets it rotated (name, fingerprint), recorded in the same transaction."""
        if event not in (StepEvent.SUCCEED, StepEvent.FAIL, StepEvent.NOT_STARTED):
            raise ValueError(f"{event.value} does not end an attempt")
        now = self._clock()
        with self._engine.begin() as db:
            row = _row(db, name)
            if row.state != StepState.RUNNING.value or row.run_id != run_id:
                raise LeaseLost(
                    f"step {name} is {row.state} under run {row.run_id}, not running under {run_id}: "
                    "its outcome was not recorded"
                )
            target = advance_step(StepState.RUNNING, event)
            values: dict[str, Any] = {
                "state": target.value,
                "updated_at": now,
                "output_sha256": output_sha256,
            }
            if target is StepState.DONE:
                values["finished_at"] = now
            if event is StepEvent.FAIL:
                values["error"] = detail
            done = db.execute(
                update(STEPS)
                .where(
                    STEPS.c.name == name, STEPS.c.state == StepState.RUNNING.value, STEPS.c.run_id == run_id
                )
                .values(**values)
            ).rowcount
            if done != 1:
                raise LeaseLost(f"step {name} changed under this run; its outcome was not recorded")
            _log(
                db,
                name,
                StepState.RUNNING,
                event,
                target,
                int(row.attempts),
                run_id,
                actor,
                now,
                detail,
                output_sha256,
            )
            if rotations:
                db.execute(
                    insert(ROTATIONS),
                    [
                        {
                            "step": name,
                            "secret": secret,
                            "fingerprint": fp,
                            "run_id": run_id,
                            "actor": actor,
                            "at": now,
                        }
                        for secret, fp in rotations
                    ],
                )
        return target

    @retried
    def interrupt_dead(self, actor: str) -> list[str]:
        """Steps left running by runs that are gone become ``interrupted``; returns them."""
        now = self._clock()
        marked: list[str] = []
        with self._engine.begin() as db:
            for row in db.execute(select(STEPS).where(STEPS.c.state == StepState.RUNNING.value)).all():
                if not self._alive(db, row.run_id, now):
                    self._change(db, row, StepEvent.INTERRUPT, None, actor, now, f"run {row.run_id} is gone")
                    marked.append(str(row.name))
        return marked

    @retried
    def decide(self, name: str, event: StepEvent, *, actor: str, reason: str | None) -> StepState:
        """An operator's decision on a step: ``rearm`` (it will run again) or ``done_by_hand``."""
        if event not in STEP_OPERATOR_EVENTS:
            raise SafetyViolation(f"'{event.value}' is not an operator's decision on a step")
        if not actor.strip():
            raise SafetyViolation("an operator's decision must name the operator")
        if not (reason and reason.strip()):
            raise SafetyViolation(f"'{event.value}' of a step needs a reason")
        now = self._clock()
        with self._engine.begin() as db:
            row = _row(db, name)
            if row.state == StepState.RUNNING.value and self._alive(db, row.run_id, now):
                raise LeaseHeld(f"step {name} is running under run {row.run_id}; stop that run first")
            if row.state == StepState.RUNNING.value:
                self._change(
                    db, row, StepEvent.INTERRUPT, None, actor.strip(), now, f"run {row.run_id} is gone"
                )
                row = _row(db, name)
            return self._change(db, row, event, None, actor.strip(), now, reason.strip())

    @retried
    def history(self, name: str) -> StepHistory:
        with self._reader.connect() as db:
            record = _record(_row(db, name))
            log = tuple(
                StepLogRecord(
                    r.id,
                    r.step,
                    StepState(r.from_state) if r.from_state else None,
                    r.event,
                    StepState(r.to_state),
                    r.attempt,
                    r.run_id,
                    r.actor,
                    r.at,
                    r.output_sha256,
                    r.detail,
                )
                for r in db.execute(select(LOG).where(LOG.c.step == name).order_by(LOG.c.id))
            )
            rotations = tuple(
                RotationRecord(r.step, r.secret, r.fingerprint, r.run_id, r.actor, r.at)
                for r in db.execute(
                    select(ROTATIONS).where(ROTATIONS.c.step == name).order_by(ROTATIONS.c.id)
                )
            )
            approvals = tuple(
                ApprovalRecord(r.id, r.run_id, r.scope, r.approver, r.approved_at, r.shown, r.automatic)
                for r in db.execute(
                    select(APPROVALS)
                    .where(APPROVALS.c.scope == approval_scope(name))
                    .order_by(APPROVALS.c.id)
                )
            )
        return StepHistory(record, log, rotations, approvals)

    @retried
    def rotations(self) -> list[RotationRecord]:
        with self._reader.connect() as db:
            return [
                RotationRecord(r.step, r.secret, r.fingerprint, r.run_id, r.actor, r.at)
                for r in db.execute(select(ROTATIONS).order_by(ROTATIONS.c.id))
            ]

    # -- inside ----------------------------------------------------------------------------------------

    def _alive(self, db: Connection, run_id: str | None, now: dt.datetime) -> bool:
        if run_id is None:
            return False
        if db.execute(dead_runs(now, self._stale).where(RUNS.c.id == run_id)).first() is not None:
            return False
        process = db.execute(select(RUNS.c.process).where(RUNS.c.id == run_id)).scalar_one_or_none()
        return not dead_here(process)

    @retried
    def approved(self, run_id: str) -> set[str]:
        """The steps given their named approval for this run (a run resumed after a crash keeps them)."""
        prefix = approval_scope("")
        with self._engine.connect() as db:
            scopes = db.execute(
                select(APPROVALS.c.scope).where(
                    APPROVALS.c.run_id == run_id, APPROVALS.c.scope.startswith(prefix)
                )
            ).scalars()
            return {scope.removeprefix(prefix) for scope in scopes}

    @staticmethod
    def _approved(db: Connection, name: str, run_id: str) -> bool:
        found = db.execute(
            select(APPROVALS.c.id).where(
                APPROVALS.c.run_id == run_id, APPROVALS.c.scope == approval_scope(name)
            )
        ).first()
        return found is not None

    @staticmethod
    def _change(
        db: Connection,
        row: Any,
        event: StepEvent,
        run_id: str | None,
        actor: str,
        now: dt.datetime,
        detail: str | None,
    ) -> StepState:
        state = StepState(row.state)
        target = advance_step(state, event)
        values: dict[str, Any] = {"state": target.value, "updated_at": now}
        if target is StepState.DONE:
            values["finished_at"] = now
        done = db.execute(
            update(STEPS).where(STEPS.c.name == row.name, STEPS.c.state == state.value).values(**values)
        ).rowcount
        if done != 1:
            raise LeaseLost(f"step {row.name} changed under this writer; nothing recorded")
        _log(db, row.name, state, event, target, int(row.attempts), run_id, actor, now, detail)
        return target


def _row(db: Connection, name: str) -> Any:
    row = db.execute(select(STEPS).where(STEPS.c.name == name)).first()
    if row is None:
        raise UnknownStep(f"no procedure step named {name!r} in the ledger")
    return row


def _record(row: Any) -> StepRecord:
    return StepRecord(
        row.name,
        StepState(row.state),
        int(row.attempts),
        row.run_id,
        row.started_at,
        row.finished_at,
        row.error,
        row.retired_at is not None,
    )


def _log(
    db: Connection,
    step: str,
    state: StepState | None,
    event: StepEvent,
    target: StepState,
    attempt: int,
    run_id: str | None,
    actor: str,
    now: dt.datetime,
    detail: str | None = None,
    output_sha256: str | None = None,
) -> None:
    db.execute(
        insert(LOG).values(
            step=step,
            from_state=None if state is None else state.value,
            event=event.value,
            to_state=target.value,
            attempt=attempt,
            run_id=run_id,
            actor=actor,
            at=now,
            output_sha256=output_sha256,
            detail=detail,
        )
    )
