"""What the restore pipeline asks of the fleet, one operation per stage.

Each operation is blocking and must enforce its own timeout (Prefect cannot interrupt a blocking call):
it returns when the stage is done or raises :class:`DriverError`. Real implementations compose the
lower capabilities (power and boot over Redfish, remote shell over SSH, deployment server, network);
the simulated fleet in :mod:`restore_flows.drivers.fake` implements the same protocol for rehearsals.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from restore_flows.errors import RestoreError
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage

if TYPE_CHECKING:  # procedures.py builds on this module
    from restore_flows.drivers.procedures import StepOutput
    from restore_flows.inventory.procedures import ProcedureStep


class DriverError(RestoreError):
    """A stage could not be done on a host. ``retryable``: worth another attempt without an operator."""

    def __init__(
        self, host: str, stage: Stage, detail: str, *, retryable: bool = True, command_sent: bool = False
    ) -> None:
        super().__init__(f"{host}: {stage.value}: {detail}")
        self.host = host
        self.stage = stage
        self.detail = detail
        self.retryable = retryable
        self.command_sent = command_sent
        """A remote command was sent before this failed: it may have run (a procedure step that
        resets a credential is then never started again without an operator)."""


class DriverTimeout(DriverError):
    pass


@dataclass(frozen=True, slots=True)
class Evidence:
    kind: str
    sha256: str
    location: str
    custodian: str


@dataclass(frozen=True, slots=True)
class Verification:
    """The result of every check of a host. Clean only if nothing failed and nothing was found."""

    failures: tuple[str, ...] = ()
    ioc_findings: tuple[str, ...] = ()
    retryable: bool = True
    """Whether checking again may change the verdict without an operator: not after the host's key or
    our login was refused, nor for a host with no checks at all."""

    @property
    def clean(self) -> bool:
        return not self.failures and not self.ioc_findings


class Fleet(Protocol):
    """The stages that change a host return what they did, in a few words, for the ledger's log
    (deployment job, image, pinned key fingerprint...); ``None`` when there is nothing to add."""

    def capture_evidence(self, host: Host) -> Evidence: ...

    def wipe(self, host: Host) -> str | None: ...

    def reimage(self, host: Host) -> str | None: ...

    def restore_backup(self, host: Host) -> str | None: ...

    def verify(self, host: Host) -> Verification: ...

    def release(self, host: Host) -> str | None: ...

    def stage_finished(self, host: Host, stage: Stage, started_at: dt.datetime) -> bool:
        """After a crash: do the host's facts show that a stage started at ``started_at`` finished?

        Resume asks this instead of repeating the stage; ``False`` hands the host to an operator.
        """
        ...

    def run_step(self, step: ProcedureStep, secrets: Mapping[str, str]) -> StepOutput:
        """A procedure step (:mod:`restore_flows.drivers.procedures`); raises ``StepError``."""
        ...


# --- Capabilities: the real fleet composes one driver per capability, chosen per host in the inventory ---


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"
    POWERING_ON = "powering_on"
    POWERING_OFF = "powering_off"


class BootDevice(StrEnum):
    PXE = "pxe"
    CD = "cd"
    DISK = "disk"


class PowerDriver(Protocol):
    """Power and boot of one host through its management controller (``RedfishPower``, ``FakePower``).

    Every call waits until the controller shows the change or raises :class:`DriverTimeout`.
    """

    def power_state(self, host: Host) -> PowerState: ...

    def power_on(self, host: Host) -> None: ...

    def power_off(self, host: Host) -> None:
        """Graceful shutdown, falling back to a forced power-off when the OS does not comply."""
        ...

    def boot_once(self, host: Host, device: BootDevice) -> None:
        """Boot from ``device`` on the next start only."""
        ...

    def power_cycle(self, host: Host) -> None:
        """Off (forced: the disk is about to be wiped or reimaged) then on."""
        ...

    def insert_media(self, host: Host, image_url: str) -> None: ...

    def eject_media(self, host: Host) -> None: ...


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str
    truncated: bool = False
    """Output beyond the driver's capture limit was dropped."""


class ShellDriver(Protocol):
    """A remote shell on one host (``ParamikoShell``, ``FakeShell``). Hosts are Windows with OpenSSH and
    PowerShell; commands are built with :func:`restore_flows.drivers.commands.render`, which quotes."""

    def run(self, host: Host, command: str, *, timeout: float, stdin: str | None = None) -> CommandResult:
        """``stdin``: written to the command's standard input, then closed (how a procedure step gets
        the secrets generated for it: never on its command line)."""
        ...

    def pin_host_key(self, host: Host, host_key: str) -> None:
        """Trust ``host_key`` ('ssh-ed25519 AAAA...') for ``host`` from now on, replacing the old one.

        Only ever called with a key from a trusted source (the deployment server's report), never with
        what the host itself presents.
        """
        ...

    def close(self) -> None: ...
