"""A server that opens a channel and then never answers the exec request.

OpenSSH cannot be made to do that, so the peer here is a paramiko server whose exec handler blocks (which
stalls its whole transport, as a wedged sshd would). paramiko's ``Channel.exec_command`` waits for the
answer with no timeout: only ParamikoShell's watchdog brings ``run()`` back.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from paramiko.common import AUTH_SUCCESSFUL, OPEN_SUCCEEDED

from restore_flows.drivers.base import DriverTimeout
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.drivers.ssh import ParamikoShell
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import HostKind, RestoreMethod, Ssh
from restore_flows.inventory.yamlsource import Location
from tests.peers.sshd import generate_key_pair

pytestmark = pytest.mark.slow


class _Stalling(paramiko.ServerInterface):
    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.exec_requests = 0

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.exec_requests += 1
        self.release.wait(15)
        return False


@dataclass
class StalledPeer:
    address: str
    port: int
    host_key_line: str
    server: _Stalling


@pytest.fixture
def stalled_peer() -> Iterator[StalledPeer]:
    host_key = generate_key_pair()
    release = threading.Event()
    server = _Stalling(release)
    transports: list[paramiko.Transport] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        transport = paramiko.Transport(conn)
        transports.append(transport)
        transport.add_server_key(paramiko.Ed25519Key.from_private_key(io.StringIO(host_key.private_text)))
        transport.start_server(server=server)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield StalledPeer("127.0.0.1", listener.getsockname()[1], host_key.public_line, server)
    finally:
        release.set()
        listener.close()
        thread.join()
        for transport in transports:
            transport.close()


def test_an_exec_request_left_unanswered_times_out(stalled_peer: StalledPeer, tmp_path: Path) -> None:
    host = Host(
        name="wedged",
        kind=HostKind.SERVER,
        site="loopback",
        role="stalled",
        department="test",
        services=(),
        depends_on=(),
        pools={},
        restore_method=RestoreMethod.REIMAGE,
        forensic_hold=False,
        location=Location(str(tmp_path), 1),
        address=stalled_peer.address,
        ssh=Ssh(user="u", port=stalled_peer.port, host_key=stalled_peer.host_key_line, key_secret="k"),
    )
    started = time.monotonic()

    with (
        ParamikoShell(FakeSecrets({"k": generate_key_pair().private_text})) as shell,
        pytest.raises(DriverTimeout, match="did not finish within 1 s"),
    ):
        shell.run(host, "echo never", timeout=1)

    assert time.monotonic() - started < 5
    assert stalled_peer.server.exec_requests == 1
