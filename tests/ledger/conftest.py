"""Ledger fixtures: every ledger test runs on SQLite and on PostgreSQL (``ledger_url_postgresql``,
in the top-level conftest: a database of its own per test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL (no schema) on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    yield request.getfixturevalue("ledger_url_postgresql")


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
