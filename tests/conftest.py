"""Shared fixtures. Unit tests must not touch the network: an accidental connection fails loudly."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from restore_flows.prefect_server import PrefectServer, drain_clients, running_server

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
        for name, text in files.items():
            (directory / f"{name}.yaml").write_text(textwrap.dedent(text).lstrip("\n"))
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
