"""Wake-on-LAN: how a workstation without a BMC is started to boot from the network.

Hospital workstations have no BMC; their firmware is set to boot from the network first when woken by
a magic packet (a fleet policy, set once, that this relies on). A woken workstation PXE-boots into
the deployment server's job. Only a host that is off can be woken: one still running after the
attack must be switched off at the desk, and its wipe times out saying so.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

from restore_flows.drivers.base import DriverError
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage

_MAC = re.compile(r"^([0-9A-Fa-f]{2})[:-]?" + r"([0-9A-Fa-f]{2})[:-]?" * 4 + r"([0-9A-Fa-f]{2})$")


def magic_packet(mac: str) -> bytes:
    """Six 0xFF bytes, then the MAC sixteen times."""
    if not _MAC.match(mac):
        raise ValueError(f"not a MAC address: {mac!r}")
    raw = bytes.fromhex(re.sub(r"[:-]", "", mac))
    return b"\xff" * 6 + raw * 16


def mac_of_packet(packet: bytes) -> str | None:
    """The MAC a magic packet wakes, or None if it is not one."""
    if len(packet) < 102 or packet[:6] != b"\xff" * 6:
        return None
    raw = packet[6:12]
    if packet[6:102] != raw * 16:
        return None
    return ":".join(f"{b:02x}" for b in raw)


def _send_udp(packet: bytes, target: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.sendto(packet, target)


@dataclass(frozen=True)
class WakeOnLan:
    address: str = "255.255.255.255"
    """Where magic packets go: the quarantine VLAN's broadcast address (routers drop 255.255.255.255)."""
    port: int = 9
    repeat: int = 3
    """Packets are UDP and may be lost: send a few."""
    send: Callable[[bytes, tuple[str, int]], None] = _send_udp

    def wake(self, host: Host, stage: Stage = Stage.WIPE) -> None:
        if not host.mac:
            raise DriverError(
                host.name, stage, "Wake-on-LAN needs the host's mac in the inventory", retryable=False
            )
        packet = magic_packet(host.mac)
        try:
            for _ in range(self.repeat):
                self.send(packet, (self.address, self.port))
        except OSError as exc:
            raise DriverError(
                host.name, stage, f"cannot send Wake-on-LAN to {self.address}:{self.port}: {exc}"
            ) from exc
