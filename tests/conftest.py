"""Shared fixtures. Unit tests must not touch the network: an accidental connection fails loudly.

PostgreSQL is at postgresql://postgres@127.0.0.1:5432/test (override with RESTORE_TEST_POSTGRES_URL).
Each test that asks gets a database of its own, created from that server and dropped afterwards.
Without a server those tests skip with the reason shown, except where RESTORE_TEST_POSTGRES_REQUIRED
is set (CI): there a missing server fails the run.
"""

from __future__ import annotations

import os
import socket
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from restore_flows.flows.server import PrefectServer, drain_clients, running_server

WriteInventory = Callable[..., Path]


@pytest.fixture(autouse=True)
def _no_outside_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only loopback may be reached; anything else is a bug in a test or in the code."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (
            host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")
        ):
            raise AssertionError(f"test tried to reach {address!r}: only loopback is allowed")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def _no_prefect_workers_left() -> Iterator[None]:
    """Stop the Prefect event and log workers a test started in this process. Left running, they
    reconnect with jittered backoff drawn from the global ``random``, which hypothesis (rightly)
    reports as a strategy using ``random`` when it happens during a later property test."""
    yield
    drain_clients(timeout=10)


@pytest.fixture
def write_inventory(tmp_path: Path) -> WriteInventory:
    """Write YAML files (name -> text, dedented) into a fresh inventory directory."""

    def write(**files: str) -> Path:
        directory = tmp_path / "inventory"
        directory.mkdir(exist_ok=True)
        for name, body in files.items():
            (directory / f"{name}.yaml").write_text(textwrap.dedent(body).lstrip("\n"))
        return directory

    return write


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server on loopback, started once per test session by the first test that asks."""
    home: Path = tmp_path_factory.mktemp("prefect-home")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with running_server(home, port=port) as server:
        yield server


POSTGRES_URL = os.environ.get(
    "RESTORE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_admin() -> Engine:
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


@pytest.fixture
def ledger_url_postgresql() -> Iterator[str]:
    """The URL of an empty PostgreSQL database of this test's own."""
    admin = _postgres_admin()
    name = f"restore_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
