"""The inventory file format: what an infrastructure engineer may write in a YAML file.

These models describe one file as written, before merging: most host fields are optional because a host
takes what it does not say from its group's ``defaults`` and then from its role. ``resolve`` turns the
merged files into :class:`~restore_flows.inventory.estate.Estate`, where every host is complete.

Everything the drivers need later (BMC, SSH, image, checks) is modelled here already so that engineers
fill the inventory in one place; the planner reads only waves, sites, pools, kinds, services and
dependencies. Secrets are never values in the inventory: fields ending in ``_secret`` hold the *name* of
a secret, which is resolved at run time.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

CATCH_ALL = "*"

# Host names are DNS labels (dots allowed for FQDNs); a name may carry one range, ``[001:040]``, which the
# loader checks separately so that a malformed range gets its own message.
Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Letters, digits, '.', '_' and '-'.",
    ),
]
HostPattern = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        description="A host name, or a range such as ws-icu-arl-[001:040] (zero padding kept).",
    ),
]
ServiceName = Annotated[
    str,
    Field(min_length=1, pattern=r"^(\*|[a-z0-9][a-z0-9_-]*)$", description="Lowercase service."),
]
# A pool name may contain '{site}', filled in with the host's site, so that one role can say
# "imaging-{site}" for every site.
PoolRef = Annotated[
    str,
    Field(
        min_length=1,
        pattern=r"^[a-z0-9{][a-z0-9_{}-]*$",
        description="A pool name; '{site}' is replaced by the host's site.",
    ),
]
# Numbers are strict (``true`` is not 1, ``"4"`` is not 4) and bounded: a value accepted here must not
# fail when a run uses it (``timeout: .inf`` would overflow a deadline, ``1e300`` minutes a timedelta).
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Seconds = Annotated[
    float,
    Field(strict=True, gt=0, le=86_400, allow_inf_nan=False, description="Seconds, at most a day."),
]
Minutes = Annotated[
    float,
    Field(strict=True, ge=0, le=43_200, allow_inf_nan=False, description="Minutes, at most 30 days."),
]


def _compiles(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
    return pattern


Regex = Annotated[str, AfterValidator(_compiles)]
# As drivers.commands fills them: ``{name}``, with ``{{`` and ``}}`` for literal braces.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TEMPLATE_NAMES = frozenset({"host", "image", "address"})


def _unknown_placeholders(template: str, allowed: set[str]) -> list[str]:
    escaped = template.replace("{{", "").replace("}}", "")
    return sorted({name for name in _PLACEHOLDER.findall(escaped) if name not in allowed})


class _Template(BaseModel):
    """A check whose ``command`` is a template: it may name ``{host}``, ``{image}``, ``{address}`` and
    the check's own fields, exactly what the check driver fills in; any other name fails the run."""

    @model_validator(mode="after")
    def _known_placeholders(self) -> Any:
        command = getattr(self, "command", None)
        if command is not None:
            fields = type(self).model_fields
            allowed = set(_TEMPLATE_NAMES) | {
                name for name in fields if name not in ("type", "command") and getattr(self, name) is not None
            }
            unknown = _unknown_placeholders(command, allowed)
            if unknown:
                names = ", ".join(f"{{{n}}}" for n in unknown)
                raise ValueError(
                    f"command uses {names}, which the check does not fill in; it may use "
                    + ", ".join(f"{{{n}}}" for n in sorted(allowed))
                    + " (write {{ and }} for literal braces)"
                )
        return self


SecretName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$",
        description="The NAME of a secret (environment variable or Prefect Secret block), never a value.",
    ),
]


class SiteKind(StrEnum):
    HOSPITAL = "hospital"
    POLYCLINIC = "polyclinic"
    REST_HOME = "rest_home"
    PSYCHIATRIC = "psychiatric"
    CRECHE = "creche"
    DATACENTER = "datacenter"


class HostKind(StrEnum):
    SERVER = "server"
    WORKSTATION = "workstation"


class RestoreMethod(StrEnum):
    REIMAGE = "reimage"
    """Install the golden image (PXE, Wake-on-LAN or deployment server), then configure."""
    BACKUP = "backup"
    """Restore a VM server from the last clean backup."""


class Stage(StrEnum):
    """The stages of a host's restore, in order; pools are consumed per stage."""

    EVIDENCE = "evidence"
    WIPE = "wipe"
    REIMAGE = "reimage"
    RESTORE = "restore"
    VERIFY = "verify"
    RELEASE = "release"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Wave(_Strict):
    """A restore wave. Waves run in the order they are listed."""

    name: Name
    services: list[ServiceName] = Field(
        min_length=1,
        description="Services restored in this wave, highest priority first; '*' = all others.",
    )
    description: str | None = None


class Site(_Strict):
    name: Name
    kind: SiteKind
    description: str | None = None


class Pool(_Strict):
    """Shared capacity: imaging slots, technicians, backup streams."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    capacity: Annotated[
        int, Field(strict=True, ge=1, le=100_000, description="How many stages may use it at once.")
    ]
    description: str | None = None


class Bmc(_Strict):
    """The server's baseboard management controller (Redfish)."""

    address: Annotated[str, Field(min_length=1, description="Host name, IP or https:// URL of the BMC.")]
    driver: Literal["redfish", "fake"] = "redfish"
    system_id: str | None = Field(default=None, description="Redfish system id; discovered if unset.")
    credentials_secret: SecretName | None = None
    verify_tls: bool = True
    ca_bundle: str | None = Field(default=None, description="Path of a CA bundle for the BMC's TLS.")


class Ssh(_Strict):
    user: str | None = None
    port: Port = 22
    host_key: str | None = Field(
        default=None, description="Pinned public host key, e.g. 'ssh-ed25519 AAAA...'."
    )
    known_hosts: str | None = Field(default=None, description="Path of a known_hosts file to pin from.")
    key_secret: SecretName | None = Field(default=None, description="Name of the private key secret.")
    shell: Literal["powershell", "posix"] = Field(
        default="powershell",
        description="The host's command language: PowerShell (Windows) or a POSIX shell (Linux appliances).",
    )


class Drivers(_Strict):
    """Which implementation drives each capability; 'fake' is the rehearsal fleet."""

    power: Literal["redfish", "wol", "fake", "none"] | None = None
    shell: Literal["ssh", "fake", "none"] | None = None
    imaging: Literal["pxe", "wol", "deployment_server", "fake"] | None = None
    backup: Literal["command", "http", "fake"] | None = None
    network: Literal["command", "http", "fake"] | None = None


# Command templates below are run in the host's shell language (``ssh.shell``) with ``{name}``
# placeholders quoted for it; without a command, a check uses the default for that language.
_COMMAND = "Command template, run over SSH; {host}, {image} and the check's own fields can be used."


class CommandCheck(_Strict, _Template):
    type: Literal["command"]
    command: str = Field(description=_COMMAND)
    expect_exit: Annotated[int, Field(strict=True, ge=-(2**31), le=2**32 - 1)] = 0
    output_pattern: Regex | None = Field(default=None, description="Regular expression stdout must match.")
    timeout: Seconds = 60


class TcpPortCheck(_Strict):
    type: Literal["tcp_port"]
    port: Port
    timeout: Seconds = 10


class HttpCheck(_Strict):
    type: Literal["http"]
    url: str = Field(description="URL to GET; '{address}' is replaced by the host's address.")
    status: Annotated[int, Field(strict=True, ge=100, le=599)] = 200
    body_pattern: Regex | None = Field(default=None, description="Regular expression the body must match.")
    timeout: Seconds = 10

    @model_validator(mode="after")
    def _only_address(self) -> HttpCheck:
        unknown = _unknown_placeholders(self.url, {"address"})
        if unknown:
            names = ", ".join(f"{{{n}}}" for n in unknown)
            raise ValueError(f"url uses {names}; the only placeholder of a URL is {{address}}")
        return self


class WindowsServiceCheck(_Strict, _Template):
    """The service must be running (on a POSIX host: the systemd unit must be active)."""

    type: Literal["windows_service"]
    service: str
    command: str | None = Field(default=None, description=_COMMAND)
    timeout: Seconds = 30


class GoldenImageCheck(_Strict, _Template):
    """The host must report the golden image id the inventory expects."""

    type: Literal["golden_image"]
    command: str | None = Field(default=None, description=_COMMAND + " Prints the image id.")
    timeout: Seconds = 30


class EdrAgentCheck(_Strict, _Template):
    """The EDR agent must be installed and running (Microsoft Defender for Endpoint: service 'Sense')."""

    type: Literal["edr_agent"]
    service: str = "Sense"
    command: str | None = Field(default=None, description=_COMMAND)
    timeout: Seconds = 30


class IocScanCheck(_Strict, _Template):
    """A finding sends the host to quarantine, not online.

    The command prints one finding per line and exits 0; no output means nothing was found; another
    exit status means the scan itself failed (a failed check, not a finding).
    """

    type: Literal["ioc_scan"]
    command: str | None = Field(default=None, description=_COMMAND)
    timeout: Seconds = 900


Check = Annotated[
    CommandCheck
    | TcpPortCheck
    | HttpCheck
    | WindowsServiceCheck
    | GoldenImageCheck
    | EdrAgentCheck
    | IocScanCheck,
    Field(discriminator="type"),
]

StagePools = dict[Stage, list[PoolRef]]

# The stages a dependency can gate. 'reimage' and 'restore' both name the rebuild, whichever the host
# has; evidence is never gated (capturing it needs nothing of the estate).
GateStage = Literal["wipe", "reimage", "restore", "verify", "release"]
_BEFORE = (
    "The stage of this host that may start only once the dependency is online: wipe, reimage or "
    "restore (the rebuild, whichever the host has), verify or release."
)


class Dependency(_Strict):
    """A dependency with the stage it gates: ``{host: pxe-arl-01, before: reimage}``."""

    host: HostPattern
    before: GateStage | None = Field(default=None, description=_BEFORE)


class HostFields(_Strict):
    """Fields a host may set; a group's ``defaults`` and a role may set the same ones."""

    kind: HostKind | None = None
    site: Name | None = None
    department: Name | None = Field(default=None, description="For reports: icu, lab, radiology...")
    services: list[ServiceName] | None = None
    depends_on: list[HostPattern | Dependency] | None = Field(
        default=None,
        description=(
            "Hosts (or ranges) that must be online before the stage that needs them; '{site}' allowed. "
            "An entry may say which stage it gates: {host: NAME, before: STAGE}."
        ),
    )
    dependencies_before: GateStage | None = Field(
        default=None,
        description=(
            "The stage the dependencies gate unless an entry says otherwise. Default: verify for a "
            "reimaged host (wiping and imaging need nothing of the estate), restore for a host restored "
            "from backup (a VM needs its hypervisor and backup server). 'wipe' gates the whole pipeline."
        ),
    )
    pools: StagePools | None = Field(default=None, description="Pools each stage consumes.")
    restore_method: RestoreMethod | None = None
    golden_image: str | None = None
    forensic_hold: bool | None = Field(
        default=None, description="Police evidence must be captured before wiping."
    )
    drivers: Drivers | None = None
    ssh: Ssh | None = None
    checks: list[Check] | None = Field(default=None, description="Checks that prove the host clean.")
    durations: dict[Stage, Minutes] | None = Field(
        default=None, description="Expected minutes per stage (rehearsal timing and ETA)."
    )
    description: str | None = None


class HostSpec(HostFields):
    name: HostPattern
    role: Name | None = None
    address: str | None = Field(default=None, description="Management address (quarantine VLAN).")
    mac: Annotated[str, Field(pattern=r"^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$")] | None = None
    bmc: Bmc | None = None


class GroupDefaults(HostFields):
    role: Name | None = None


class Role(HostFields):
    """What a kind of machine is and how it is restored; hosts inherit what they do not say."""

    name: Name


class Group(_Strict):
    """Hosts that share defaults, so that 1,500 workstations need a few lines, not 1,500 entries."""

    description: str | None = None
    defaults: GroupDefaults = Field(default_factory=GroupDefaults)
    hosts: list[HostSpec] = Field(min_length=1)


# -- procedures: named steps that are not one host's pipeline (forest recovery, credential resets) --

StepStage = Literal["evidence", "wipe", "reimage", "restore", "verify", "release"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(h|min|m)\s*$")


def duration_minutes(value: str | float) -> float:
    """'10h', '45min' (or '45m'), or a number of minutes."""
    if isinstance(value, int | float):
        return float(value)
    found = _DURATION.match(value)
    if found is None:
        raise ValueError(
            f"'{value}' is not a duration: write minutes, or a number with h or min (10h, 45min)"
        )
    number = float(found.group(1))
    minutes = number * 60 if found.group(2) == "h" else number
    if minutes > 43_200:
        raise ValueError(f"'{value}' is longer than 30 days: write a wait a run can keep")
    return minutes


Duration = Annotated[
    Annotated[float, Field(strict=True, ge=0, le=43_200, allow_inf_nan=False)] | str,
    Field(description="Minutes, or a number with h or min: 10h, 45min."),
]


class StepTarget(_Strict):
    """Where a step's command runs: one host (or a range), or every host of a role, in turn."""

    host: HostPattern | None = None
    role: Name | None = None

    @model_validator(mode="after")
    def _one(self) -> StepTarget:
        if (self.host is None) == (self.role is None):
            raise ValueError("say either host or role")
        return self


class StepHttp(_Strict):
    """One HTTP call from the orchestrator (a privileged-access vault, an appliance's API)."""

    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    status: Annotated[int, Field(strict=True, ge=100, le=599)] = 200
    body: str | None = None
    timeout: Seconds = 60


class StepNeed(_Strict):
    """A stage of a host done, not the whole host: ``{host: dc-dc1-01, stage: verify}`` (restored and
    verified clean, still in quarantine)."""

    host: Name
    stage: StepStage


class NotBefore(_Strict):
    """No sooner than ``after`` since ``step`` was done, and why (always written down)."""

    step: Name
    after: Duration
    reason: str = Field(min_length=1, description="Why this wait, and who chose it if it was shortened.")

    @field_validator("after")
    @classmethod
    def _duration(cls, value: str | float) -> str | float:
        duration_minutes(value)
        return value


class StepGateSpec(_Strict):
    """The hosts a step gates: one selector (a wave, a role, a kind, a site, or hosts by name); they
    may start ``before`` only once the step is done."""

    wave: Name | None = None
    role: Name | None = None
    kind: HostKind | None = None
    site: Name | None = None
    hosts: list[HostPattern] | None = None
    before: GateStage = Field(
        default="release", description="The stage of those hosts that waits for the step (default release)."
    )

    @model_validator(mode="after")
    def _one(self) -> StepGateSpec:
        said = [f for f in ("wave", "role", "kind", "site", "hosts") if getattr(self, f) is not None]
        if len(said) != 1:
            raise ValueError("say exactly one of wave, role, kind, site or hosts")
        return self


def _not_before_schema(schema: dict[str, Any]) -> None:
    listed = schema["properties"]["not_before"]
    schema["properties"]["not_before"] = {
        "anyOf": [dict(listed["items"]), {"type": "array", "items": listed["items"]}],
        "description": listed.get("description", ""),
    }


class Procedure(_Strict):
    """A named step: a command on a host (or a role's hosts) or an HTTP call, the check that proves it
    worked, what it needs first, how long it must wait after another step, and what waits for it."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_not_before_schema)

    name: Name
    description: str | None = None
    runs_on: StepTarget | None = Field(default=None, description="Where the command runs, over SSH.")
    command: str | None = Field(
        default=None,
        description="Command template, run over SSH; {host}, {address} and {step} can be used. "
        "Secrets it generates arrive on standard input, one NAME=value line each.",
    )
    timeout: Seconds = 600
    http: StepHttp | None = None
    check: Check | None = Field(default=None, description="Proves the step worked.")
    needs: list[Name | StepNeed] = Field(
        default_factory=list,
        description="Hosts online or other steps done first; {host: H, stage: S} for a stage of a host. "
        "The hosts a step runs on are needed online unless named here with a stage.",
    )
    not_before: list[NotBefore] = Field(
        default_factory=list,
        description="Waits after other steps; one mapping or a list: {step: S, after: 10h, reason: R}.",
    )
    approval: bool = Field(default=False, description="Needs a named approval when it is due.")
    gates: list[StepGateSpec] = Field(default_factory=list)
    minutes: Minutes = Field(default=10, description="Planned duration, for the forecast.")
    generates: list[SecretName] = Field(
        default_factory=list,
        description="Secrets the product generates and hands to the command on standard input; the "
        "ledger keeps only that they were rotated, and a fingerprint.",
    )
    repeatable: bool = Field(
        default=False,
        description="Safe to run again after a failure or interruption (idempotent). A credential "
        "reset is not: left false, a step that may have run waits for 'restore decide rearm'.",
    )

    @field_validator("not_before", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _action(self) -> Procedure:
        shell = self.runs_on is not None or self.command is not None
        if shell and self.http is not None:
            raise ValueError("a step runs a command (runs_on, command) or makes an http call, not both")
        if not shell and self.http is None:
            raise ValueError("say what the step does: runs_on and command, or http")
        if shell and (self.runs_on is None or self.command is None):
            raise ValueError("a command step needs both runs_on and command")
        return self


class InventoryFile(_Strict):
    """One inventory file. All files of the directory are merged; any section may be in any file."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="restore-orchestrator inventory file",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    waves: list[Wave] = Field(default_factory=list, description="Restore waves, in restore order.")
    sites: list[Site] = Field(default_factory=list)
    pools: list[Pool] = Field(default_factory=list)
    roles: list[Role] = Field(default_factory=list)
    groups: list[Group] = Field(default_factory=list)
    hosts: list[HostSpec] = Field(default_factory=list)
    procedures: list[Procedure] = Field(
        default_factory=list,
        description="Named steps that are not one host's pipeline, e.g. forest recovery.",
    )
