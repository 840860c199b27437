"""Migrations match the models, round-trip, and unmigrated databases are refused."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

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
