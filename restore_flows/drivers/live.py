"""The real fleet: each stage composed from one driver per capability, chosen per host.

* wipe: the deployment server gets a new job for the host's golden image, then the host is started
  into it: by its BMC (boot once from the network, power cycle; ``imaging: pxe``, the default for a
  host with a BMC), by Wake-on-LAN (``imaging: wol``, the default for a host with only a MAC), or by the
  deployment server itself (``imaging: deployment_server``). The stage ends when the server reports the
  disk wiped.
* reimage: the same job goes on to install; the stage ends when the server reports the expected image,
  and the new SSH host key from the server's report is pinned (never the key the host presents).
* verify: every check of the host (:mod:`restore_flows.drivers.checks`).
* restore from backup (VM servers, whose wipe is the restore itself) and network release: command
  templates run over SSH on a management host.
* evidence: taken by the forensic team and registered by hand (``restore evidence add``); a live run
  never images a disk for forensics on its own.

Every call has a timeout (:class:`LiveSettings`); a failure is a :class:`DriverError` naming host,
stage and what to do.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

import httpx

from restore_flows.drivers.base import (
    BootDevice,
    DriverError,
    DriverTimeout,
    Evidence,
    PowerDriver,
    ShellDriver,
    Verification,
)
from restore_flows.drivers.checks import CheckRunner
from restore_flows.drivers.commands import Dialect, command_line, render
from restore_flows.drivers.deployment import PROGRESS, Deployment, DeploymentStatus, Phase, wait_for_phase
from restore_flows.drivers.procedures import LiveSteps, StepOutput
from restore_flows.drivers.ssh import describe_key, parse_host_key
from restore_flows.drivers.wol import WakeOnLan
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import RestoreMethod, Stage
from restore_flows.inventory.procedures import ProcedureStep


class Verifier(Protocol):
    def verify(self, host: Host) -> Verification: ...


@dataclass(frozen=True)
class LiveSettings:
    wipe_timeout: float = 3600.0
    install_timeout: float = 7200.0
    poll_seconds: float = 10.0
    management_host: str | None = None
    """Inventory name of the host that runs backup restores and network releases."""
    backup_command: str | None = None
    """Template run on the management host to restore a VM server from backup ({host}, {address}, {mac})."""
    release_command: str | None = None
    """Template run on the management host to move a host from the quarantine VLAN to production."""
    command_timeout: float = 1800.0
    backup_url: str | None = None
    """URL template POSTed to restore a VM from backup ({host}, {address}, {mac}, URL-quoted)."""
    release_url: str | None = None
    """URL template POSTed to move a host to production ({host}, {address}, {mac}, URL-quoted)."""


@dataclass
class LiveFleet:
    power: Mapping[str, PowerDriver]
    """Power drivers by the names the inventory uses (``drivers.power``): 'redfish', 'fake'."""
    shell: ShellDriver
    deployment: Deployment | None
    checks: Verifier
    hosts: Mapping[str, Host]
    settings: LiveSettings = field(default_factory=LiveSettings)
    wol: WakeOnLan = field(default_factory=WakeOnLan)
    http: httpx.Client | None = None
    """For backup restores and releases done by HTTP calls (a hypervisor's or a network manager's API);
    its base URL, TLS and token are the caller's."""
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _jobs: dict[str, str] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def capture_evidence(self, host: Host) -> Evidence:
        raise DriverError(
            host.name,
            Stage.EVIDENCE,
            "a live run does not image disks for forensics: the forensic team registers its evidence "
            f"with 'restore evidence add {host.name} ...', then the host can be wiped",
            retryable=False,
        )

    def wipe(self, host: Host) -> str | None:
        if host.restore_method is RestoreMethod.BACKUP:
            # A VM server is rebuilt by restoring its disks from backup, which replaces them whole; there
            # is nothing to boot from the network and no separate wipe to run.
            return "VM server: its disks are replaced by the backup restore that follows"
        image = self._image(host, Stage.WIPE)
        method = host.drivers.imaging or ("wol" if host.bmc is None and host.mac else "pxe")
        power = self._power(host, Stage.WIPE) if method == "pxe" else None
        if method not in ("pxe", "wol", "deployment_server"):
            raise DriverError(host.name, Stage.WIPE, f"imaging {method!r} cannot run live", retryable=False)
        deployment = self._deployment(host, Stage.WIPE)
        job = deployment.assign(host.name, image, host.mac)
        with self._lock:
            self._jobs[host.name] = job
        if power is not None:
            power.boot_once(host, BootDevice.PXE)
            power.power_cycle(host)
        elif method == "wol":
            self.wol.wake(host)
        # 'deployment_server': the server starts the host itself (its agent or its own power control).
        self._wait(deployment, host, Phase.WIPED, Stage.WIPE, self.settings.wipe_timeout, job=job)
        started = {"pxe": "network boot and power cycle by the BMC", "wol": "Wake-on-LAN"}
        return f"deployment job {job} for {image}; {started.get(method, 'started by the deployment server')}"

    def reimage(self, host: Host) -> str | None:
        image = self._image(host, Stage.REIMAGE)
        deployment = self._deployment(host, Stage.REIMAGE)
        with self._lock:
            job = self._jobs.get(host.name)
        if job is None:
            # This process did not start the wipe (a resumed run): the server's latest job is the one
            # that wiped the host, if it is past its wipe.
            latest = deployment.status(host.name)
            if latest is None or PROGRESS[latest.phase] < PROGRESS[Phase.WIPED]:
                raise DriverError(
                    host.name,
                    Stage.REIMAGE,
                    "the deployment server has no wiped job for this host",
                    retryable=False,
                )
            job = latest.job
        status = self._wait(
            deployment, host, Phase.INSTALLED, Stage.REIMAGE, self.settings.install_timeout, job=job
        )
        return self._accept_install(host, image, status)

    def restore_backup(self, host: Host) -> str | None:
        if (host.drivers.backup or "command") == "http":
            return self._http_call(host, Stage.RESTORE, self.settings.backup_url, "backup_url")
        return self._management(host, Stage.RESTORE, self.settings.backup_command, "backup_command")

    def verify(self, host: Host) -> Verification:
        return self.checks.verify(host)

    def release(self, host: Host) -> str | None:
        if (host.drivers.network or "command") == "http":
            return self._http_call(host, Stage.RELEASE, self.settings.release_url, "release_url")
        return self._management(host, Stage.RELEASE, self.settings.release_command, "release_command")

    def run_step(self, step: ProcedureStep, secrets: Mapping[str, str]) -> StepOutput:
        checks = self.checks if isinstance(self.checks, CheckRunner) else CheckRunner(self.shell)
        return LiveSteps(self.shell, self.hosts, checks).run_step(step, secrets)

    def stage_finished(self, host: Host, stage: Stage, started_at: dt.datetime) -> bool:
        if stage not in (Stage.WIPE, Stage.REIMAGE) or self.deployment is None:
            return False  # no fact shows these finished: an operator decides, or the stage is redone
        status = self.deployment.status(host.name)
        if status is None or status.changed_at < started_at or status.phase is Phase.FAILED:
            return False
        if stage is Stage.WIPE:
            return PROGRESS[status.phase] >= PROGRESS[Phase.WIPED]
        if status.phase is not Phase.INSTALLED or not host.golden_image:
            return False
        self._accept_install(host, host.golden_image, status)
        return True

    # -- parts -----------------------------------------------------------------------------------------

    def _accept_install(self, host: Host, image: str, status: DeploymentStatus) -> str:
        if status.image_id != image:
            raise DriverError(
                host.name,
                Stage.REIMAGE,
                f"deployment server installed image {status.image_id!r}, the inventory expects {image!r}",
                retryable=False,
            )
        if not status.host_key:
            raise DriverError(
                host.name,
                Stage.REIMAGE,
                "deployment server did not report the new SSH host key: nothing trusted to pin",
                retryable=False,
            )
        self.shell.pin_host_key(host, status.host_key)
        fingerprint = key_fingerprint(status.host_key)
        return f"deployment job {status.job} installed {image}; new host key {fingerprint} pinned"

    def _wait(
        self, deployment: Deployment, host: Host, phase: Phase, stage: Stage, timeout: float, *, job: str
    ) -> DeploymentStatus:
        return wait_for_phase(
            deployment,
            host.name,
            phase,
            job=job,
            stage=stage,
            timeout=timeout,
            poll=self.settings.poll_seconds,
            clock=self.clock,
            sleep=self.sleep,
        )

    def _image(self, host: Host, stage: Stage) -> str:
        if not host.golden_image:
            raise DriverError(host.name, stage, "no golden_image in the inventory", retryable=False)
        return host.golden_image

    def _power(self, host: Host, stage: Stage) -> PowerDriver:
        name = host.drivers.power or ("redfish" if host.bmc else "none")
        driver = self.power.get(name)
        if driver is None:
            raise DriverError(
                host.name, stage, f"no power driver {name!r} for this host (give it a bmc)", retryable=False
            )
        return driver

    def _deployment(self, host: Host, stage: Stage) -> Deployment:
        if self.deployment is None:
            raise DriverError(host.name, stage, "no deployment server is configured", retryable=False)
        return self.deployment

    def _management(self, host: Host, stage: Stage, template: str | None, setting: str) -> str:
        manager = self.hosts.get(self.settings.management_host or "")
        if template is None or manager is None:
            raise DriverError(
                host.name,
                stage,
                f"no {setting} and management host configured for {stage.value}",
                retryable=False,
            )
        dialect = Dialect(manager.ssh.shell) if manager.ssh else Dialect.POWERSHELL
        params = {"host": host.name, "address": host.address or "", "mac": host.mac or ""}
        line = command_line(render(template, dialect, params), dialect)
        result = self.shell.run(manager, line, timeout=self.settings.command_timeout)
        if result.exit_status != 0:
            raise DriverError(
                host.name,
                stage,
                f"{setting} on {manager.name} exited {result.exit_status}: {result.stderr.strip()[:200]}",
            )
        return f"{setting} ran on {manager.name}"

    def _http_call(self, host: Host, stage: Stage, template: str | None, setting: str) -> str:
        if template is None or self.http is None:
            raise DriverError(host.name, stage, f"no {setting} configured for {stage.value}", retryable=False)
        values = {"host": host.name, "address": host.address or "", "mac": host.mac or ""}
        # Values are URL-quoted whole, so that nothing from the inventory can change the path or query.
        url = re.sub(r"\{(host|address|mac)\}", lambda m: quote(values[m.group(1)], safe=""), template)
        try:
            response = self.http.post(url, json=values, timeout=self.settings.command_timeout)
        except httpx.TimeoutException as exc:
            raise DriverTimeout(host.name, stage, f"{setting}: POST {url} timed out") from exc
        except httpx.HTTPError as exc:
            raise DriverError(
                host.name, stage, f"{setting}: POST {url} failed ({type(exc).__name__})"
            ) from exc
        if response.status_code >= 300:
            raise DriverError(
                host.name,
                stage,
                f"{setting}: POST {url} answered {response.status_code}: {response.text.strip()[:200]}",
                retryable=response.status_code >= 500 or response.status_code in (408, 429),
            )
        return f"{setting}: POST {url} answered {response.status_code}"


def key_fingerprint(line: str) -> str:
    """'ssh-ed25519 SHA256:...' as OpenSSH prints it, for the log: a key line itself is long and opaque."""
    try:
        return describe_key(parse_host_key(line))
    except ValueError:
        return "(unreadable key)"
