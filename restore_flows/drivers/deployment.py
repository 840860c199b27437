"""The deployment server: what wipes and installs a host that boots from the network.

Hospitals run WDS/MDT, SCCM, Foreman or similar; the orchestrator speaks one small HTTP contract to it
(an adapter in front of the real product is a few dozen lines):

* ``POST /api/v1/hosts/{host}/jobs`` with ``{"image": ..., "mac": ...}`` -> ``{"job": id}``: on its
  next network boot, wipe this host's disks and install ``image``. A new job replaces an unfinished one;
  every wipe is a new job, so an old job's "installed" can never pass for this one's.
* ``GET /api/v1/hosts/{host}``: the latest job, ``{"host", "job", "phase", "image_id", "host_key",
  "changed_at", "error"}``, ``phase`` one of ``assigned``, ``wiping``, ``wiped``, ``installing``,
  ``installed``, ``failed``.

The server's report is the trusted source of a reimaged host's new SSH host key: the host itself
could be anyone until it is proven clean.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from restore_flows.drivers.base import DriverError, DriverTimeout
from restore_flows.inventory.models import Stage


class Phase(StrEnum):
    ASSIGNED = "assigned"
    WIPING = "wiping"
    WIPED = "wiped"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"


# How far along the install each phase is: a wipe is done once the server reports any phase from WIPED on.
PROGRESS = {
    Phase.ASSIGNED: 0,
    Phase.WIPING: 1,
    Phase.WIPED: 2,
    Phase.INSTALLING: 3,
    Phase.INSTALLED: 4,
    Phase.FAILED: -1,
}


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    host: str
    job: str
    phase: Phase
    image_id: str | None
    host_key: str | None
    changed_at: dt.datetime
    error: str | None = None


class Deployment(Protocol):
    def assign(self, host: str, image: str, mac: str | None) -> str:
        """A new job; returns its id."""
        ...

    def status(self, host: str) -> DeploymentStatus | None:
        """``None`` when the server has no job for the host."""
        ...


@dataclass
class DeploymentServerClient:
    """The HTTP contract above over httpx; ``client`` is injected (tests pass a MockTransport)."""

    client: httpx.Client
    token: SecretStr | None = None

    def assign(self, host: str, image: str, mac: str | None) -> str:
        body = self._call(
            "POST", host, f"/api/v1/hosts/{quote(host, safe='')}/jobs", {"image": image, "mac": mac}
        )
        if not isinstance(body, dict) or not isinstance(body.get("job"), str):
            raise DriverError(host, Stage.WIPE, "deployment server did not say which job it created")
        return str(body["job"])

    def status(self, host: str) -> DeploymentStatus | None:
        body = self._call("GET", host, f"/api/v1/hosts/{quote(host, safe='')}", None)
        if body is None:
            return None
        try:
            return DeploymentStatus(
                host=host,
                job=str(body["job"]),
                phase=Phase(body["phase"]),
                image_id=body.get("image_id"),
                host_key=body.get("host_key"),
                changed_at=dt.datetime.fromisoformat(body["changed_at"]),
                error=body.get("error"),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DriverError(
                host, Stage.REIMAGE, f"deployment server sent an unreadable status ({exc})"
            ) from exc

    def _call(self, method: str, host: str, path: str, payload: dict[str, Any] | None) -> Any:
        headers = {"Authorization": f"Bearer {self.token.get_secret_value()}"} if self.token else {}
        try:
            response = self.client.request(method, path, json=payload, headers=headers)
        except httpx.TimeoutException as exc:
            raise DriverTimeout(
                host, Stage.REIMAGE, f"deployment server timed out ({method} {path})"
            ) from exc
        except httpx.HTTPError as exc:
            raise DriverError(
                host, Stage.REIMAGE, f"deployment server unreachable ({type(exc).__name__})"
            ) from exc
        if method == "GET" and response.status_code == 404:
            return None
        if response.status_code in (401, 403):
            raise DriverError(
                host,
                Stage.REIMAGE,
                f"deployment server refused the credentials ({response.status_code})",
                retryable=False,
            )
        if response.status_code >= 400:
            raise DriverError(
                host,
                Stage.REIMAGE,
                f"deployment server answered {response.status_code} to {method} {path}: "
                f"{response.text[:200]}",
                retryable=response.status_code >= 500,
            )
        return response.json() if response.content else None


def wait_for_phase(
    deployment: Deployment,
    host: str,
    wanted: Phase,
    *,
    job: str | None = None,
    since: dt.datetime | None = None,
    stage: Stage,
    timeout: float,
    poll: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> DeploymentStatus:
    """Poll until job ``job`` (or, when resuming without its id, the job that changed after ``since``)
    reached ``wanted`` or further; a failed job raises."""
    deadline = clock() + timeout
    last: DeploymentStatus | None = None
    while True:
        last = deployment.status(host)
        ours = last is not None and (
            last.job == job if job is not None else since is not None and last.changed_at >= since
        )
        if last is not None and ours and last.phase is Phase.FAILED:
            raise DriverError(host, stage, f"deployment server reports failure: {last.error or 'no detail'}")
        if last is not None and ours and PROGRESS[last.phase] >= PROGRESS[wanted]:
            return last
        if clock() >= deadline:
            seen = f"{last.phase.value} since {last.changed_at.isoformat()}" if last else "no job"
            raise DriverTimeout(
                host, stage, f"deployment server did not report {wanted.value} within {timeout:g} s ({seen})"
            )
        sleep(poll)
