"""The fakes: the simulated fleet (the rehearsal stand-in for every driver, with realistic durations),
and one fake per capability driver for unit tests.

Durations are the planned minutes per stage (:mod:`restore_flows.scheduling.durations`: the
inventory's ``durations`` or the documented defaults), scaled by ``time_scale`` (0 = instant; 1/60
makes a minute last a second) and, with ``noise``, by a factor drawn in [1 - noise, 1 + noise].
Failures are injected per stage at the given rates. Every draw comes from a generator seeded by
(seed, host, stage, attempt), so a rehearsal fails and drifts the same hosts whatever the timing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from restore_flows.drivers.base import (
    BootDevice,
    CommandResult,
    DriverError,
    Evidence,
    PowerState,
    Verification,
)
from restore_flows.drivers.deployment import DeploymentStatus, Phase
from restore_flows.drivers.procedures import StepError, StepOutput
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage
from restore_flows.inventory.procedures import ProcedureStep
from restore_flows.scheduling.durations import draw, planned_minutes


class RehearsalKnobs(Protocol):
    """How an operator tunes a rehearsal's fleet (a flow's parameters, a site session's)."""

    @property
    def time_scale(self) -> float: ...
    @property
    def fail_rate(self) -> float: ...
    @property
    def duration_noise(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def broken_hosts(self) -> Sequence[str]: ...


def rehearsal_fleet(knobs: RehearsalKnobs) -> SimulatedFleet:
    """The simulated fleet these knobs describe: the same on every machine that runs a stage of it."""
    return SimulatedFleet(
        time_scale=knobs.time_scale,
        fail_rates=dict.fromkeys(Stage, knobs.fail_rate),
        seed=knobs.seed,
        broken=dict.fromkeys(knobs.broken_hosts, Stage.WIPE),
        noise=knobs.duration_noise,
    )


@dataclass
class SimulatedFleet:
    time_scale: float = 0.0
    """Real seconds per simulated minute divided by 60: 1.0 is real time, 0 is instant."""
    fail_rates: Mapping[Stage, float] = field(default_factory=dict)
    seed: int = 0
    ioc_rate: float = 0.0
    """Share of verifications that find an indicator of compromise (the host goes to quarantine)."""
    broken: Mapping[str, Stage] = field(default_factory=dict)
    """Hosts whose given stage fails on every attempt (for drills and tests)."""
    noise: float = 0.0
    """Each stage takes its planned time times a factor drawn in [1 - noise, 1 + noise]."""
    broken_steps: frozenset[str] = frozenset()
    """Procedure steps that fail after their command ran (for drills and tests)."""
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    _attempts: dict[tuple[str, Stage], int] = field(default_factory=dict, init=False)
    _step_attempts: dict[str, int] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def capture_evidence(self, host: Host) -> Evidence:
        self._work(host, Stage.EVIDENCE)
        digest = hashlib.sha256(f"{self.seed}:{host.name}:evidence".encode()).hexdigest()
        return Evidence("disk-image", digest, f"rehearsal://forensics/{host.name}.E01", "rehearsal")

    def wipe(self, host: Host) -> None:
        self._work(host, Stage.WIPE)

    def reimage(self, host: Host) -> None:
        self._work(host, Stage.REIMAGE)

    def restore_backup(self, host: Host) -> None:
        self._work(host, Stage.RESTORE)

    def verify(self, host: Host) -> Verification:
        attempt = self._work(host, Stage.VERIFY)
        if self._draw(host, Stage.VERIFY, attempt, "ioc") < self.ioc_rate:
            return Verification(ioc_findings=(f"rehearsal IOC on {host.name}",))
        return Verification()

    def release(self, host: Host) -> None:
        self._work(host, Stage.RELEASE)

    def stage_finished(self, host: Host, stage: Stage, started_at: dt.datetime) -> bool:
        needed = dt.timedelta(seconds=planned_minutes(host, stage) * 60 * self.time_scale * (1 + self.noise))
        return self.clock() - started_at >= needed

    def run_step(self, step: ProcedureStep, secrets: Mapping[str, str]) -> StepOutput:
        """A procedure step takes its planned minutes. A ``broken_steps`` step fails after running;
        the fail rate makes a step fail before it starts (its target unreachable), which a run retries.
        What the step was given is never kept: the digest is of the step's name and attempt."""
        with self._lock:
            attempt = self._step_attempts.get(step.name, 0) + 1
            self._step_attempts[step.name] = attempt
        rate = max(self.fail_rates.values(), default=0.0)
        if rate and draw(self.seed, step.name, "step", attempt, "fail") < rate:
            raise StepError(step.name, f"simulated: target unreachable (attempt {attempt})", started=False)
        factor = 1.0
        if self.noise:
            factor += self.noise * (2.0 * draw(self.seed, step.name, "step", attempt, "noise") - 1.0)
        seconds = step.minutes * 60 * self.time_scale * factor
        if seconds > 0:
            self.sleep(seconds)
        if step.name in self.broken_steps:
            raise StepError(step.name, "simulated failure after the command ran", started=True)
        digest = hashlib.sha256(f"{self.seed}:{step.name}:{attempt}".encode()).hexdigest()
        where = ", ".join(step.target_hosts) or "the orchestrator"
        return StepOutput(digest, f"simulated on {where} ({len(secrets)} secret(s) handed over)")

    def seconds(self, host: Host, stage: Stage, attempt: int = 1) -> float:
        factor = 1.0
        if self.noise:
            factor += self.noise * (2.0 * self._draw(host, stage, attempt, "noise") - 1.0)
        return planned_minutes(host, stage) * 60 * self.time_scale * factor

    def attempts_before(self, host: str, stage: Stage, done: int) -> None:
        """``done`` attempts of this stage were made elsewhere (another process of the run, as a
        site's session is): the draws go on from the next, as one fleet would have drawn them."""
        with self._lock:
            self._attempts[(host, stage)] = done

    def _work(self, host: Host, stage: Stage) -> int:
        with self._lock:
            attempt = self._attempts.get((host.name, stage), 0) + 1
            self._attempts[(host.name, stage)] = attempt
        seconds = self.seconds(host, stage, attempt)
        if seconds > 0:
            self.sleep(seconds)
        if self.broken.get(host.name) is stage:
            raise DriverError(host.name, stage, "simulated permanent failure", retryable=False)
        rate = self.fail_rates.get(stage, 0.0)
        if rate and self._draw(host, stage, attempt, "fail") < rate:
            raise DriverError(host.name, stage, f"simulated failure (attempt {attempt})")
        return attempt

    def _draw(self, host: Host, stage: Stage, attempt: int, purpose: str) -> float:
        return draw(self.seed, host.name, stage.value, attempt, purpose)


@dataclass
class FakePower:
    """Stands in for :class:`~restore_flows.drivers.redfish.RedfishPower`: power and boot in memory.

    ``broken`` hosts raise on every call, as a BMC that cannot be reached would.
    """

    states: dict[str, PowerState] = field(default_factory=dict)
    boot_override: dict[str, BootDevice] = field(default_factory=dict)
    media: dict[str, str] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    on_power_cycle: Callable[[Host, BootDevice | None], None] | None = None
    """Called after a power cycle with the one-time boot device it consumed (the PXE hook)."""
    calls: list[tuple[str, str]] = field(default_factory=list)

    def power_state(self, host: Host) -> PowerState:
        self._call(host, "power_state")
        return self.states.get(host.name, PowerState.ON)

    def power_on(self, host: Host) -> None:
        self._call(host, "power_on")
        self.states[host.name] = PowerState.ON

    def power_off(self, host: Host) -> None:
        self._call(host, "power_off")
        self.states[host.name] = PowerState.OFF

    def boot_once(self, host: Host, device: BootDevice) -> None:
        self._call(host, f"boot_once {device.value}")
        self.boot_override[host.name] = device

    def power_cycle(self, host: Host) -> None:
        self._call(host, "power_cycle")
        self.states[host.name] = PowerState.ON
        device = self.boot_override.pop(host.name, None)
        if self.on_power_cycle is not None:
            self.on_power_cycle(host, device)

    def insert_media(self, host: Host, image_url: str) -> None:
        self._call(host, "insert_media")
        self.media[host.name] = image_url

    def eject_media(self, host: Host) -> None:
        self._call(host, "eject_media")
        self.media.pop(host.name, None)

    def _call(self, host: Host, what: str) -> None:
        self.calls.append((host.name, what))
        if host.name in self.broken:
            raise DriverError(host.name, Stage.REIMAGE, f"simulated unreachable BMC during {what}")


@dataclass
class FakeShell:
    """Stands in for :class:`~restore_flows.drivers.ssh.ParamikoShell`: scripted answers per command.

    ``responders`` are tried in order with (host, command line); the first that returns a result answers.
    A command nobody answers exits 127, as a missing program would. Every command is kept in ``commands``.
    """

    responders: list[Callable[[Host, str], CommandResult | None]] = field(default_factory=list)
    host_keys: dict[str, str] = field(default_factory=dict)
    commands: list[tuple[str, str]] = field(default_factory=list)
    stdin: list[tuple[str, str]] = field(default_factory=list)
    """(host, what was written to standard input), for commands given any."""
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def run(self, host: Host, command: str, *, timeout: float, stdin: str | None = None) -> CommandResult:
        with self._lock:
            self.commands.append((host.name, command))
            if stdin is not None:
                self.stdin.append((host.name, stdin))
        for responder in self.responders:
            result = responder(host, command)
            if result is not None:
                return result
        return CommandResult(127, "", f"fake shell: no answer for {command!r}")

    def pin_host_key(self, host: Host, host_key: str) -> None:
        self.host_keys[host.name] = host_key

    def close(self) -> None:
        pass


@dataclass
class FakeDeployment:
    """Stands in for :class:`~restore_flows.drivers.deployment.DeploymentServerClient`, and is the state
    behind the test deployment server: a host with a job that boots from the network is wiped and gets
    its image and a new host key (from ``new_host_key``, which the test peer uses to re-key its sshd)."""

    new_host_key: Callable[[str], str] = lambda host: f"ssh-ed25519 FAKE-{host}"
    installed_image: Callable[[str, str], str] = lambda host, image: image
    """Which image an install really puts on the host (tests make it differ)."""
    fail: set[str] = field(default_factory=set)
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    _jobs: dict[str, dict[str, str | None]] = field(default_factory=dict, init=False)
    _status: dict[str, DeploymentStatus] = field(default_factory=dict, init=False)
    _count: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def assign(self, host: str, image: str, mac: str | None) -> str:
        with self._lock:
            self._count += 1
            job = f"job-{self._count}"
            self._jobs[host] = {"job": job, "image": image, "mac": mac}
            self._status[host] = DeploymentStatus(host, job, Phase.ASSIGNED, None, None, self.clock())
            return job

    def status(self, host: str) -> DeploymentStatus | None:
        with self._lock:
            return self._status.get(host)

    def host_of_mac(self, mac: str) -> str | None:
        """The host whose pending job names this MAC (how a server knows a machine that PXE-boots)."""
        wanted = mac.lower().replace("-", ":")
        with self._lock:
            for host, job in self._jobs.items():
                if str(job.get("mac") or "").lower().replace("-", ":") == wanted:
                    return host
        return None

    def network_boot(self, host: str) -> bool:
        """The host booted from the network: run its job, if it has one. Returns whether it had."""
        with self._lock:
            job = self._jobs.pop(host, None)
        if job is None:
            return False
        job_id, image = str(job["job"]), str(job["image"])
        if host in self.fail:
            self._set(host, job_id, Phase.FAILED, error="simulated install failure")
            return True
        self._set(host, job_id, Phase.WIPING)
        self._set(host, job_id, Phase.WIPED)
        self._set(host, job_id, Phase.INSTALLING)
        installed = self.installed_image(host, image)
        self._set(host, job_id, Phase.INSTALLED, installed, self.new_host_key(host))
        return True

    def _set(
        self,
        host: str,
        job: str,
        phase: Phase,
        image: str | None = None,
        key: str | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            self._status[host] = DeploymentStatus(host, job, phase, image, key, self.clock(), error)
