"""Ledger fixtures: every ledger test runs on SQLite and on PostgreSQL.

PostgreSQL is at postgresql://postgres@127.0.0.1:5432/test (override with RESTORE_TEST_POSTGRES_URL).
Each test gets a database of its own, created from that server and dropped afterwards. Without a
server the PostgreSQL variants skip with the reason shown, except where RESTORE_TEST_POSTGRES_REQUIRED
is set (CI): there a missing server fails the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan

POSTGRES_URL = os.environ.get(
    "RESTORE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


def _postgres_admin() -> Engine | None:
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        if os.environ.get("RESTORE_TEST_POSTGRES_REQUIRED"):
            pytest.fail(f"PostgreSQL is required here and unreachable at {POSTGRES_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.__class__.__name__}")
    return engine


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL (no schema) on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    admin = _postgres_admin()
    assert admin is not None
    name = f"restore_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    """A migrated ledger database."""
    engine = make_engine(ledger_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sample_plan() -> Plan:
    return plan(load_estate(Path(__file__).resolve().parents[2] / "inventory"))


@pytest.fixture
def ledger(engine: Engine, sample_plan: Plan) -> Ledger:
    """A ledger with the sample estate enrolled."""
    ledger = Ledger(engine)
    ledger.sync_inventory(sample_plan.estate, sample_plan)
    return ledger
