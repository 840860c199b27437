"""Wake-on-LAN packets, sent for real over UDP on loopback to the test deployment server."""

from __future__ import annotations

import time

import httpx
import pytest

from restore_flows.drivers.base import DriverError
from restore_flows.drivers.deployment import DeploymentServerClient, Phase, wait_for_phase
from restore_flows.drivers.fake import FakeDeployment
from restore_flows.drivers.wol import WakeOnLan, mac_of_packet, magic_packet
from restore_flows.inventory.estate import Host
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from tests.conftest import WriteInventory
from tests.peers.deploy import deploy_server

ESTATE = """
waves: [{name: all, services: ["*"]}]
sites: [{name: arl, kind: hospital}]
roles: [{name: ws, kind: workstation, services: [desk]}]
hosts:
  - {name: ws-01, site: arl, role: ws, mac: "52:54:00:aa:bb:01"}
  - {name: ws-02, site: arl, role: ws}
"""


@pytest.fixture
def hosts(write_inventory: WriteInventory) -> dict[str, Host]:
    return dict(load_estate(write_inventory(estate=ESTATE)).hosts)


def test_a_magic_packet_is_six_ff_then_the_mac_sixteen_times() -> None:
    packet = magic_packet("52:54:00:AA:bb:01")
    assert len(packet) == 102
    assert packet[:6] == b"\xff" * 6
    assert packet[6:] == bytes.fromhex("525400aabb01") * 16
    assert mac_of_packet(packet) == "52:54:00:aa:bb:01"
    assert mac_of_packet(magic_packet("52-54-00-aa-bb-01")) == "52:54:00:aa:bb:01"
    assert mac_of_packet(packet[:-1]) is None
    assert mac_of_packet(b"\x00" * 6 + packet[6:]) is None
    with pytest.raises(ValueError, match="not a MAC"):
        magic_packet("52:54:00:aa:bb")


def test_wake_sends_a_few_packets_and_needs_a_mac(hosts: dict[str, Host]) -> None:
    sent: list[tuple[bytes, tuple[str, int]]] = []
    wol = WakeOnLan("10.9.255.255", 9, send=lambda packet, target: sent.append((packet, target)))
    wol.wake(hosts["ws-01"])
    assert sent == [(magic_packet("52:54:00:aa:bb:01"), ("10.9.255.255", 9))] * 3
    with pytest.raises(DriverError, match="needs the host's mac") as missing:
        wol.wake(hosts["ws-02"])
    assert not missing.value.retryable

    def broken(packet: bytes, target: tuple[str, int]) -> None:
        raise OSError("Network is unreachable")

    with pytest.raises(
        DriverError, match=r"cannot send Wake-on-LAN to 10\.9\.255\.255:9: Network is unreachable"
    ):
        WakeOnLan("10.9.255.255", send=broken).wake(hosts["ws-01"])


def test_a_woken_workstation_with_a_job_is_installed(hosts: dict[str, Host]) -> None:
    state = FakeDeployment()
    with deploy_server(state, {}) as server, httpx.Client(base_url=server.url) as http:
        client = DeploymentServerClient(http)
        job = client.assign("ws-01", "win11-gold-3", "52:54:00:aa:bb:01")
        WakeOnLan("127.0.0.1", server.wol_port).wake(hosts["ws-01"])
        done = wait_for_phase(
            client,
            "ws-01",
            Phase.INSTALLED,
            job=job,
            stage=Stage.REIMAGE,
            timeout=10,
            poll=0.05,
            clock=time.monotonic,
            sleep=time.sleep,
        )
        assert done.image_id == "win11-gold-3"
        # A packet for a MAC with no job wakes nothing.
        assert state.host_of_mac("52:54:00:aa:bb:99") is None
