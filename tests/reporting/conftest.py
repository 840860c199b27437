from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WriteInventory
from tests.reporting.scenarios import Scenario, new_ledger, troubled


@pytest.fixture
def fresh(tmp_path: Path, write_inventory: WriteInventory) -> Iterator[Scenario]:
    """The estate enrolled, nothing done."""
    scenario = new_ledger(tmp_path, write_inventory)
    yield scenario
    scenario.engine.dispose()


@pytest.fixture
def trouble(fresh: Scenario) -> Scenario:
    """After a run with a failure, a host on hold, approvals and evidence (scenarios.troubled)."""
    troubled(fresh)
    return fresh
