"""Real OpenSSH sshd peers on loopback for the SSH driver tests (see :mod:`tests.peers.sshd`).

Without sshd (or root) the peer tests skip with the reason; CI sets ``RESTORE_TEST_PEERS_REQUIRED=1`` so
that they fail instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import ParamikoShell
from tests.peers.sshd import CLIENT_KEY_SECRET, SshdHost, require_peers, sshd_hosts, unavailable_reason


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[SshdHost]]:
    """Three sshd hosts, each on its own 127.x.y.z address with its own host key."""
    require_peers(unavailable_reason())
    with sshd_hosts(tmp_path / "sshd", 3) as hosts:
        yield hosts


@pytest.fixture
def peer(peers: list[SshdHost]) -> SshdHost:
    return peers[0]


@pytest.fixture
def secrets(peer: SshdHost) -> FakeSecrets:
    return FakeSecrets({CLIENT_KEY_SECRET: peer.client_key_text})


@pytest.fixture
def shell(secrets: FakeSecrets) -> Iterator[ParamikoShell]:
    with ParamikoShell(secrets) as driver:
        yield driver
