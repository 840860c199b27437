"""A real Prefect server for the flow tests: started once per test session, on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from restore_flows.prefect_server import PrefectServer, running_server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home: Path = tmp_path_factory.mktemp("prefect-home")
    with running_server(home, port=_free_port()) as server:
        yield server
