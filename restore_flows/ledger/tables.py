"""The ledger's tables (SQLAlchemy 2, typed). Rows never leave the ledger package: the repository
returns plain records.

Leases live on the host row itself so that taking one is a single conditional UPDATE, atomic on
SQLite and PostgreSQL alike, and every later write can check the fencing token in the same statement.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names are fixed so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in and out. SQLite keeps no zone, so naive values read back are UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger: use timezone-aware UTC")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class HostRow(Base):
    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    site: Mapped[str] = mapped_column(String(253))
    kind: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(253))
    department: Mapped[str] = mapped_column(String(253))
    wave: Mapped[str] = mapped_column(String(253))
    restore_method: Mapped[str] = mapped_column(String(32))
    forensic_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(32))
    # Set when the host reaches verified_clean; cleared only by an operator's recompromise.
    clean: Mapped[bool] = mapped_column(Boolean, default=False)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    enrolled_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    # Lease: which run may act on the host, until when, and the fencing token it must present.
    fence: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_run: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_token: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    __table_args__ = (Index(None, "wave"), Index(None, "state"))


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(253))
    actor: Mapped[str] = mapped_column(String(253))
    started_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    ended_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    external_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    """Renewed while the run's process lives: a run whose heartbeat is stale is dead."""
    process: Mapped[str | None] = mapped_column(String(253), nullable=True)
    """'machine:pid' of the process running it: on the same machine, a dead pid is a dead run at once."""


class TransitionRow(Base):
    """Append-only: never updated or deleted (database triggers refuse it too)."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name"))
    from_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    event: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    actor: Mapped[str] = mapped_column(String(253))
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index(None, "host", "id"),)


class AttemptRow(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name"))
    stage: Mapped[str] = mapped_column(String(32))
    number: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    ended_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    executed_by: Mapped[str | None] = mapped_column(String(253), nullable=True)
    """Which site worker ran the stage ('arl@host-name'); empty when the run's own process did."""

    __table_args__ = (UniqueConstraint("host", "stage", "number"),)


class EvidenceRow(Base):
    __tablename__ = "evidence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name"))
    kind: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    location: Mapped[str] = mapped_column(Text)
    custodian: Mapped[str] = mapped_column(String(253))
    recorded_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), nullable=True)

    __table_args__ = (Index(None, "host"),)


class ApprovalRow(Base):
    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    scope: Mapped[str] = mapped_column(String(253))
    approver: Mapped[str] = mapped_column(String(253))
    approved_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    shown: Mapped[str] = mapped_column(Text)
    automatic: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index(None, "run_id"),)


class ApprovedHostRow(Base):
    """Which hosts an approval covers: a destructive event checks for its own row here."""

    __tablename__ = "approved_hosts"

    approval_id: Mapped[int] = mapped_column(ForeignKey("approvals.id"), primary_key=True)
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name"), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))

    __table_args__ = (Index(None, "run_id", "host"),)


class PoolRow(Base):
    """Shared capacity from the inventory (imaging slots, technicians, backup streams)."""

    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    capacity: Mapped[int] = mapped_column(Integer)


class PoolClaimRow(Base):
    """A stage's claim on one slot of a pool: waiting until granted, then held until released.

    Claims expire unless renewed, so a crashed run's slots come back by themselves.
    """

    __tablename__ = "pool_claims"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pool: Mapped[str] = mapped_column(ForeignKey("pools.name"))
    host: Mapped[str] = mapped_column(String(253))
    run_id: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(BigInteger)
    """Smaller goes first: the wave's position, then the host's place in the wave's start order."""
    requested_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    granted_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    released_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    """Kept after release (or expiry) so that who got a slot when, and who was waiting, can be audited."""

    __table_args__ = (
        Index(None, "pool", "released_at", "granted_at"),
        Index(None, "run_id", "released_at"),
    )


class StepRow(Base):
    """A procedure step of the inventory (forest recovery, credential resets) and where it is.

    Starting one is a conditional UPDATE from ``pending`` naming the run: two runs can never both
    start it, and a run that died while it ran leaves it ``running`` under a dead run, which the next
    run marks ``interrupted`` for an operator.
    """

    __tablename__ = "procedure_steps"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The run that last started it."""
    started_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    """When it was last done (its waits count from here)."""
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    enrolled_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class StepLogRow(Base):
    """Append-only, like the transitions of hosts (database triggers refuse updates and deletes)."""

    __tablename__ = "step_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    step: Mapped[str] = mapped_column(ForeignKey("procedure_steps.name"))
    from_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    event: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    actor: Mapped[str] = mapped_column(String(253))
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SHA-256 of what the command printed (stdout, then stderr): the output itself may hold secrets."""
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index(None, "step", "id"),)


class SecretRotationRow(Base):
    """That a step rotated a secret, when, by which run and whose approval: never the secret. Append-only."""

    __tablename__ = "secret_rotations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    step: Mapped[str] = mapped_column(ForeignKey("procedure_steps.name"))
    secret: Mapped[str] = mapped_column(String(128))
    """The secret's name as the inventory gives it."""
    fingerprint: Mapped[str] = mapped_column(String(80))
    """'sha256:' and the first 16 hex digits of the SHA-256 of the value: enough to match the vault's
    copy, nothing to recover it from."""
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    actor: Mapped[str] = mapped_column(String(253))
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index(None, "step"),)


class StageOrderRow(Base):
    """A stage the campaign's scheduler sent to a site's session (the site mode): a mailbox, not
    history. The scheduler writes it ``queued``; the site's session flow run takes it (``taken``, naming
    itself), runs it and writes the result (``done``); the scheduler reads the result back. An order
    whose session was lost with its worker is ``dropped`` by the scheduler and sent again later. What
    the stage did is in the host's transitions and attempts, as for any stage."""

    __tablename__ = "stage_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    site: Mapped[str] = mapped_column(String(253))
    host: Mapped[str] = mapped_column(String(253))
    stage: Mapped[str] = mapped_column(String(32))
    claims: Mapped[str] = mapped_column(Text, default="[]")
    """The pool claims granted to the stage, as JSON: the stage gives them back."""
    state: Mapped[str] = mapped_column(String(16))
    session: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The session (its flow run) that took it."""
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The stage's result, as JSON (no secret: states, errors, who holds the host)."""
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index(None, "run_id", "site", "state"),)


class SiteSessionRow(Base):
    """A site's session (the site mode), heard from in the ledger while it takes its orders. The
    scheduler reads this beside the Prefect server's view of the site's worker: a server too busy to
    record the worker's polls must not make a working site look lost (its stages withdrawn and sent
    again, loading the server further)."""

    __tablename__ = "site_sessions"

    session: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The session's flow run id, as the orders it takes name it."""
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    site: Mapped[str] = mapped_column(String(253))
    worker: Mapped[str] = mapped_column(String(253))
    started_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    heard_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    retired_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    """When the scheduler took it for lost and started another: it ends once its stages are done
    (alive after all, it must not hold one of its worker's places for good)."""

    __table_args__ = (Index(None, "run_id"),)
