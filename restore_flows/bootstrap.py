"""Where real adapters are chosen and wired: settings in, ready-to-use objects out. Nothing at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from restore_flows.inventory.estate import Estate
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import engine_from_settings, require_current_schema, upgrade
from restore_flows.ledger.records import SyncReport
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.settings import Settings


@dataclass(frozen=True)
class Context:
    settings: Settings
    engine: Engine
    ledger: Ledger


@contextmanager
def open_ledger(settings: Settings, *, rehearsal: bool = False, migrate: bool = False) -> Iterator[Context]:
    """The ledger, after checking the database is migrated to this code's revision; closed after.

    ``migrate`` brings it to the current revision first: for the rehearsal ledger, which the project
    owns entirely; the live ledger is migrated only by an operator (``restore db upgrade``).
    """
    engine = engine_from_settings(settings, rehearsal)
    try:
        if migrate:
            upgrade(engine)
        require_current_schema(engine)
        yield Context(settings, engine, Ledger(engine))
    finally:
        engine.dispose()


def load_and_sync(context: Context, inventory: Path) -> tuple[Estate, Plan, SyncReport]:
    """Read the inventory, plan it, and bring the ledger's host list up to date with it."""
    estate = load_estate(inventory)
    the_plan = plan(estate)
    report = context.ledger.sync_inventory(estate, the_plan)
    return estate, the_plan, report
