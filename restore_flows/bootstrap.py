"""Where real adapters are chosen and wired: settings in, ready-to-use objects out. Nothing at import."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from restore_flows.inventory.estate import Estate
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import engine_from_settings, require_current_schema, upgrade
from restore_flows.ledger.records import SyncReport
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.settings import Settings

if TYPE_CHECKING:
    import httpx

    from restore_flows.drivers.live import LiveFleet
    from restore_flows.drivers.secrets import Secrets


@dataclass(frozen=True)
class Context:
    settings: Settings
    engine: Engine
    ledger: Ledger


@contextmanager
def open_ledger(
    settings: Settings, *, rehearsal: bool = False, migrate: bool = False, connections: int | None = None
) -> Iterator[Context]:
    """The ledger, after checking the database is migrated to this code's revision; closed after.

    ``migrate`` brings it to the current revision first: for the rehearsal ledger, which the project
    owns entirely; the live ledger is migrated only by an operator (``restore db upgrade``).
    ``connections`` bounds this process's connections to it (a site's session: see the settings).
    """
    engine = engine_from_settings(settings, rehearsal, connections)
    try:
        if migrate:
            upgrade(engine)
        require_current_schema(engine)
        yield Context(settings, engine, Ledger(engine, stale_seconds=settings.run_stale_seconds))
    finally:
        engine.dispose()


def load_and_sync(context: Context, inventory: Path) -> tuple[Estate, Plan, SyncReport]:
    """Read the inventory, plan it, and bring the ledger's host list up to date with it."""
    estate = load_estate(inventory, context.settings.max_hosts)
    the_plan = plan(estate)
    report = context.ledger.sync_inventory(estate, the_plan)
    return estate, the_plan, report


@contextmanager
def live_fleet(settings: Settings, estate: Estate, secrets: Secrets | None = None) -> Iterator[LiveFleet]:
    """The real fleet for a live run: Redfish, SSH, the deployment server and the checks, closed after."""
    # Imported here: paramiko and the drivers are only needed by live runs, and 'restore validate' or
    # 'restore plan' should start quickly.
    from restore_flows.drivers.checks import CheckRunner
    from restore_flows.drivers.deployment import DeploymentServerClient
    from restore_flows.drivers.live import LiveFleet, LiveSettings
    from restore_flows.drivers.redfish import RedfishPower
    from restore_flows.drivers.secrets import secrets_from
    from restore_flows.drivers.ssh import ParamikoShell
    from restore_flows.drivers.wol import WakeOnLan

    secrets = secrets or secrets_from(settings.secret_sources)
    with ExitStack() as stack:
        power = stack.enter_context(RedfishPower(secrets, poll_timeout=settings.power_timeout_seconds))
        shell = ParamikoShell(secrets, max_sessions=settings.ssh_max_sessions)
        stack.callback(shell.close)
        deployment = None
        if settings.deployment_url:
            token = (
                secrets.get(settings.deployment_token_secret) if settings.deployment_token_secret else None
            )
            http = stack.enter_context(
                _api_client(settings.deployment_ca_bundle, 30.0, base_url=settings.deployment_url)
            )
            deployment = DeploymentServerClient(http, token)
        integrations = None
        if settings.backup_url or settings.release_url:
            headers = {}
            if settings.integrations_token_secret:
                bearer = secrets.get(settings.integrations_token_secret).get_secret_value()
                headers["Authorization"] = f"Bearer {bearer}"
            integrations = stack.enter_context(
                _api_client(settings.integrations_ca_bundle, 60.0, headers=headers)
            )
        yield LiveFleet(
            power={"redfish": power},
            shell=shell,
            deployment=deployment,
            checks=CheckRunner(shell),
            hosts=estate.hosts,
            settings=LiveSettings(
                wipe_timeout=settings.wipe_timeout_seconds,
                install_timeout=settings.install_timeout_seconds,
                poll_seconds=settings.live_poll_seconds,
                management_host=settings.management_host,
                backup_command=settings.backup_command,
                release_command=settings.release_command,
                backup_url=settings.backup_url,
                release_url=settings.release_url,
            ),
            http=integrations,
            wol=WakeOnLan(settings.wol_address, settings.wol_port),
        )


def _api_client(ca_bundle: str | None, timeout: float, **options: Any) -> httpx.Client:
    """An HTTP client for a service on the hospital's network: its certificate checked against the
    system store (where the hospital's internal CA is installed) or ``ca_bundle``, and no proxy or
    credentials taken from the worker's environment."""
    import httpx

    verify = ssl.create_default_context(cafile=ca_bundle)
    return httpx.Client(verify=verify, timeout=timeout, trust_env=False, **options)
