"""A small deployment server for tests: the PXE/imaging role, on loopback.

It speaks the HTTP contract of :mod:`restore_flows.drivers.deployment` over the state of
:class:`~restore_flows.drivers.fake.FakeDeployment`, and listens for sushy-tools' power notifications
(``EXTERNAL_NOTIFICATION_URL``): when a system it knows goes from Off to On while its boot override
says network (or says nothing), the host with a job is "installed": new image id, new host key
(``FakeDeployment.new_host_key``, which the tests point at their sshd harness), reported through the
status API. It also hears Wake-on-LAN packets on a UDP port of 127.0.0.1: a woken workstation whose
MAC has a job PXE-boots into it.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from restore_flows.drivers.fake import FakeDeployment
from restore_flows.drivers.wol import mac_of_packet


@dataclass
class DeployServer:
    url: str
    notify_url: str
    state: FakeDeployment
    systems: dict[str, str]
    """Redfish system name or id -> inventory host name."""
    wol_port: int = 0
    """UDP port on 127.0.0.1 where it hears Wake-on-LAN packets: a woken host with a job PXE-boots."""
    notifications: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def deploy_server(state: FakeDeployment, systems: Mapping[str, str]) -> Iterator[DeployServer]:
    server: DeployServer
    last_power: dict[str, Any] = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"null")

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            if parts[:3] == ["api", "v1", "hosts"] and len(parts) == 4:
                status = state.status(parts[3])
                if status is None:
                    return self._send(404, {"error": "no job"})
                return self._send(
                    200,
                    {
                        "host": status.host,
                        "job": status.job,
                        "phase": status.phase.value,
                        "image_id": status.image_id,
                        "host_key": status.host_key,
                        "changed_at": status.changed_at.isoformat(),
                        "error": status.error,
                    },
                )
            return self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            parts = self.path.strip("/").split("/")
            if parts[:3] == ["api", "v1", "hosts"] and len(parts) == 5 and parts[4] == "jobs":
                body = self._body()
                return self._send(201, {"job": state.assign(parts[3], body["image"], body.get("mac"))})
            return self._send(404, {"error": "not found"})

        def do_PUT(self) -> None:
            # sushy-tools' notifier: the system's JSON after a power change.
            system = self._body() or {}
            server.notifications.append(system)
            # sushy sends its fake driver's record of the system (name, uuid, power_state, boot_device),
            # not a Redfish resource.
            host = systems.get(str(system.get("name"))) or systems.get(str(system.get("uuid")))
            power = system.get("power_state")
            with lock:
                before = last_power.get(host or "")
                if host:
                    last_power[host] = power
            # sushy also notifies boot-override changes and pending changes: only a host seen Off that
            # is now On has booted, and it boots from the network if the override says so.
            target = system.get("boot_device")
            if host and before == "Off" and power == "On" and target in (None, "Pxe"):
                state.network_boot(host)
            return self._send(204)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    server = DeployServer(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/notify", state, dict(systems))
    thread = threading.Thread(target=httpd.serve_forever, name="deploy-server", daemon=True)
    thread.start()
    wol = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wol.bind(("127.0.0.1", 0))
    wol.settimeout(0.1)
    server.wol_port = wol.getsockname()[1]
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                packet = wol.recv(1024)
            except TimeoutError:
                continue
            mac = mac_of_packet(packet)
            host = state.host_of_mac(mac) if mac else None
            if host:
                state.network_boot(host)

    waker = threading.Thread(target=listen, name="deploy-server-wol", daemon=True)
    waker.start()
    try:
        yield server
    finally:
        stop.set()
        waker.join(timeout=5)
        wol.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
