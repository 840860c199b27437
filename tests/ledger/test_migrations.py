"""Migrations match the models, round-trip, and unmigrated databases are refused."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.pool import NullPool

from restore_flows.ledger.db import (
    SchemaError,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    require_current_schema,
    upgrade,
)
from restore_flows.ledger.tables import Base


def test_head_matches_the_models(ledger_url: str) -> None:
    engine = make_engine(ledger_url)
    upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_downgrade_and_upgrade_round_trip(ledger_url: str) -> None:
    engine = make_engine(ledger_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    assert set(inspect(engine).get_table_names()) >= {"hosts", "transitions", "attempts", "evidence"}
    require_current_schema(engine)
    engine.dispose()


def test_unmigrated_and_outdated_databases_are_refused(ledger_url: str) -> None:
    engine = make_engine(ledger_url)
    with pytest.raises(SchemaError, match="not set up: run 'restore db upgrade'"):
        require_current_schema(engine)
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    with pytest.raises(SchemaError, match="at revision older, this code needs"):
        require_current_schema(engine)
    engine.dispose()


def _terminated_once(engine: Engine, admin_url: str, starting: str) -> list[int]:
    """Terminate the engine's connection, from another, just before the first statement that starts
    with ``starting`` is sent on it (the server waits until that backend is gone). Returns the pids cut."""
    cut: list[int] = []
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def cut_once(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if not cut and statement.lstrip().upper().startswith(starting):
            pid = int(cursor.connection.info.backend_pid)
            with admin.connect() as db:
                assert db.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}).scalar_one()
            cut.append(pid)

    event.listen(engine, "before_cursor_execute", cut_once)
    return cut


def test_a_connection_terminated_mid_migration_is_retried(ledger_url_postgresql: str) -> None:
    """PostgreSQL runs a migration in one transaction: cut off in the middle, it is rolled back and run
    again whole on a new connection, rather than failing a rehearsal's start or 'restore db upgrade'."""
    engine = make_engine(ledger_url_postgresql)
    cut = _terminated_once(engine, ledger_url_postgresql, "CREATE TABLE")
    upgrade(engine)
    assert len(cut) == 1
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) >= {"hosts", "transitions", "runs", "pool_claims"}
    engine.dispose()


def test_a_connection_terminated_while_reading_the_revision_is_retried(ledger_url_postgresql: str) -> None:
    setup = make_engine(ledger_url_postgresql)
    upgrade(setup)
    setup.dispose()
    engine = make_engine(ledger_url_postgresql)
    cut = _terminated_once(engine, ledger_url_postgresql, "SELECT ALEMBIC_VERSION")
    require_current_schema(engine)
    assert len(cut) == 1
    engine.dispose()


def test_a_busy_connection_pool_is_waited_for_not_failed(ledger_url_postgresql: str) -> None:
    """With every connection of the process's pool busy past the pool's wait, a ledger call waits
    again (nothing was sent yet) instead of failing the host it serves."""
    engine = create_engine(ledger_url_postgresql, pool_size=1, max_overflow=0, pool_timeout=0.2)
    upgrade(engine)
    held = engine.connect()
    freed = threading.Timer(1.0, held.close)  # the busy connection comes back after five pool waits
    freed.start()
    try:
        assert current_revision(engine) == head_revision()
    finally:
        freed.join()
        engine.dispose()
