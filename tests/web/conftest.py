from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from restore_flows.settings import Settings
from tests.conftest import WriteInventory
from tests.reporting.scenarios import Scenario, new_ledger


@pytest.fixture
def scenario(tmp_path: Path, write_inventory: WriteInventory) -> Iterator[Scenario]:
    """The estate enrolled in a rehearsal ledger of its own; the live ledger is not set up."""
    found = new_ledger(tmp_path, write_inventory, name="rehearsal")
    yield found
    found.engine.dispose()


@pytest.fixture
def settings(scenario: Scenario, tmp_path: Path) -> Settings:
    return Settings(
        inventory=scenario.inventory,
        data_dir=tmp_path / "data",
        rehearsal_database_url=scenario.url,
        database_url=f"sqlite:///{tmp_path / 'live-not-migrated.sqlite3'}",
    )


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: no proxy from the environment may stand between the test and loopback.
    with httpx.Client(timeout=30, trust_env=False) as http:
        yield http
