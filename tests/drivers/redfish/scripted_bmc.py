"""A scripted Redfish BMC built from the recorded DMTF payloads: one handler for ``httpx.MockTransport``
(in-process unit tests) and for :func:`tests.peers.sushy.loopback_http` (the same BMC over a real socket).

It behaves as the DMTF mockup describes (sessions, VirtualMedia under the manager, Enabled "Once" read
back) and can be told to misbehave: never change power, ignore a graceful shutdown, answer queued errors.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PAYLOADS = Path(__file__).parent / "payloads"

SYSTEM = "/redfish/v1/Systems/437XR1138R2"
RESET = SYSTEM + "/Actions/ComputerSystem.Reset"
SESSIONS = "/redfish/v1/SessionService/Sessions"
MANAGER = "/redfish/v1/Managers/BMC"
MEDIA = MANAGER + "/VirtualMedia"
CD = MEDIA + "/CD1"
FLOPPY = MEDIA + "/Floppy1"

# Where each reset type leaves the power.
RESET_RESULT = {
    "On": "On",
    "ForceOn": "On",
    "ForceOff": "Off",
    "GracefulShutdown": "Off",
    "ForceRestart": "On",
}


def payload(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((PAYLOADS / f"{name}.json").read_text())
    return loaded


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def error(status: int, name: str) -> httpx.Response:
    """An error answer with a recorded Redfish error body."""
    return json_response(status, payload(name))


@dataclass
class ScriptedBmc:
    user: str = "admin"
    password: str = "pa55:w0rd-ish"
    power: str = "On"
    sessions: bool = True
    """Offer a SessionService (DMTF); False answers like sushy-tools (basic auth only, 404 there)."""
    changes_power: bool = True
    """False: accepts every reset and never changes power (a stuck BMC)."""
    ignores_graceful: bool = False
    """The OS ignores GracefulShutdown: accepted, power stays on."""
    transition_reads: int = 0
    """How many reads show PoweringOn/PoweringOff before a change lands."""
    busy_after_reset: int = 0
    """How many reads of the system answer 503 after a reset (a BMC busy with the change)."""
    enabled_reads_continuous: bool = False
    """Read BootSourceOverrideEnabled back as "Continuous" whatever was set, as sushy-tools does."""
    system: dict[str, Any] = field(default_factory=lambda: payload("computer_system"))
    collection: dict[str, Any] = field(default_factory=lambda: payload("system_collection"))
    cd: dict[str, Any] = field(default_factory=lambda: payload("virtual_media_cd"))
    requests: list[httpx.Request] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    _queued: dict[tuple[str, str], deque[httpx.Response]] = field(default_factory=dict)
    _pending: list[str] = field(default_factory=list)
    _busy: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sessions_made: int = 0

    def queue(self, method: str, path: str, *responses: httpx.Response) -> None:
        """Answer the next requests to (method, path) with ``responses``, then behave normally."""
        self._queued.setdefault((method, path), deque()).extend(responses)

    def sent(self, method: str, path: str | None = None) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and (path is None or r.url.path == path)]

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            return self._answer(request)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path.rstrip("/") or "/"
        queued = self._queued.get((method, path))
        if queued:
            return queued.popleft()
        if method in ("POST", "PATCH") and request.headers.get("Content-Type") != "application/json":
            return json_response(415, {"error": {"message": "Content-Type must be application/json"}})
        if path == "/redfish/v1":
            root = payload("service_root") if self.sessions else payload("sushy_service_root")
            return json_response(200, root)
        if path == SESSIONS and method == "POST":
            return self._login(request)
        if not self._authorized(request):
            return error(401, "error_401_no_valid_session")
        if path.startswith(SESSIONS + "/") and method == "DELETE":
            self.tokens.discard(request.headers.get("X-Auth-Token", ""))
            return httpx.Response(204)
        if path == "/redfish/v1/Systems" and method == "GET":
            return json_response(200, self.collection)
        if path == SYSTEM and method == "GET":
            if self._busy:
                self._busy -= 1
                return httpx.Response(503)
            return json_response(200, self._read_system())
        if path == SYSTEM and method == "PATCH":
            boot = json.loads(request.content).get("Boot", {})
            self.system["Boot"].update(boot)
            if self.enabled_reads_continuous:
                self.system["Boot"]["BootSourceOverrideEnabled"] = "Continuous"
            return httpx.Response(204)
        if path == RESET and method == "POST":
            return self._reset(json.loads(request.content).get("ResetType"))
        if path == MANAGER and method == "GET":
            return json_response(200, payload("manager"))
        if path == MEDIA and method == "GET":
            return json_response(200, payload("virtual_media_collection"))
        if path == FLOPPY and method == "GET":
            return json_response(200, payload("virtual_media_floppy"))
        if path == CD and method == "GET":
            return json_response(200, self.cd)
        if path == CD + "/Actions/VirtualMedia.InsertMedia" and method == "POST":
            self.cd.update(Image=json.loads(request.content)["Image"], Inserted=True, ConnectedVia="URI")
            return httpx.Response(204)
        if path == CD + "/Actions/VirtualMedia.EjectMedia" and method == "POST":
            self.cd.update(Image=None, Inserted=False, ConnectedVia="NotConnected")
            return httpx.Response(204)
        return json_response(404, {"error": {"code": "Base.1.16.ResourceMissingAtURI", "message": path}})

    def _login(self, request: httpx.Request) -> httpx.Response:
        if not self.sessions:
            return json_response(404, {"error": {"message": "Not Found"}})
        body = json.loads(request.content)
        if (body.get("UserName"), body.get("Password")) != (self.user, self.password):
            return error(401, "error_401_no_valid_session")
        self._sessions_made += 1
        token = f"token-{self._sessions_made}"
        self.tokens.add(token)
        session = payload("session")
        location = f"{SESSIONS}/{self._sessions_made}"
        session["@odata.id"] = location
        return json_response(201, session, {"X-Auth-Token": token, "Location": location})

    def _authorized(self, request: httpx.Request) -> bool:
        if request.headers.get("X-Auth-Token") in self.tokens:
            return True
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return bool(request.headers.get("Authorization") == f"Basic {expected}")

    def _read_system(self) -> dict[str, Any]:
        if self._pending:
            self.power = self._pending.pop(0)
        system = copy.deepcopy(self.system)
        system["PowerState"] = self.power
        return system

    def _reset(self, reset_type: object) -> httpx.Response:
        allowed = self.system["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"]
        if reset_type not in allowed or not isinstance(reset_type, str):
            return error(400, "error_400_value_not_in_list")
        self.resets.append(reset_type)
        self._busy = self.busy_after_reset
        target = RESET_RESULT.get(reset_type)
        if (
            target is None
            or not self.changes_power
            or (reset_type == "GracefulShutdown" and self.ignores_graceful)
        ):
            return httpx.Response(204)
        if target != self.power:
            moving = "PoweringOn" if target == "On" else "PoweringOff"
            self._pending = [moving] * self.transition_reads + [target]
        return httpx.Response(204)
