"""Procedure steps, resolved: work that is not one host's pipeline (forest recovery, credential resets).

The inventory's ``procedures:`` section lists named steps (see the file format in
:mod:`restore_flows.inventory.models`); the loader resolves each into a :class:`ProcedureStep`, where
every host name is expanded and every reference checked. Planning, scheduling, the ledger and the
drivers read these.

A step's *needs* are hosts online, a stage of a host done (a *milestone*: the first domain controller
restored and verified, still in quarantine), or other steps done. Its *waits* hold it for some time
after another step (the second ``krbtgt`` reset no sooner than the ticket lifetime after the first).
What it *gates* (hosts of a wave, a role, a kind, a site, or named) waits for it before a stage, as
for a dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from restore_flows.inventory.estate import GATE_POSITION
from restore_flows.inventory.models import Check, Stage
from restore_flows.inventory.yamlsource import Location


def milestone(host: str, stage: Stage) -> str:
    """The name of "``stage`` of ``host`` is done", as a dependency (host names cannot contain '@')."""
    return f"{host}@{stage.value}"


def split_milestone(name: str) -> tuple[str, Stage] | None:
    host, at, stage = name.partition("@")
    return (host, Stage(stage)) if at else None


@dataclass(frozen=True, slots=True)
class Need:
    name: str
    """A host or another step."""
    stage: Stage | None = None
    """For a host: that stage of it done (None: the host online)."""

    @property
    def key(self) -> str:
        """The dependency's name for the scheduler: the host, the step or the milestone."""
        return self.name if self.stage is None else milestone(self.name, self.stage)

    def describe(self) -> str:
        return self.name if self.stage is None else f"{self.name} ({self.stage.value} done)"


@dataclass(frozen=True, slots=True)
class StepWait:
    """No sooner than ``minutes`` after ``step`` was done, because ``reason`` (always written down)."""

    step: str
    minutes: float
    reason: str


@dataclass(frozen=True, slots=True)
class StepGate:
    """``hosts`` may start ``before`` (and every later stage) only once the step is done."""

    selector: str
    """As written: 'wave icu', 'role ad-dc', 'kind workstation', 'site arl', 'hosts dc-dc1-02, ...'."""
    hosts: tuple[str, ...]
    before: Stage


@dataclass(frozen=True, slots=True)
class ShellAction:
    """A command template run over SSH on each of ``hosts`` in turn (quoted as for the checks)."""

    hosts: tuple[str, ...]
    command: str
    timeout: float


@dataclass(frozen=True, slots=True)
class HttpAction:
    """One HTTP call from the orchestrator (a PAM vault, an appliance's API)."""

    url: str
    method: str
    status: int
    timeout: float
    body: str | None = None


Action = ShellAction | HttpAction


@dataclass(frozen=True, slots=True)
class ProcedureStep:
    name: str
    action: Action
    minutes: float
    """Planned duration, for the forecast."""
    location: Location
    description: str | None = None
    check: Check | None = None
    """Proves the step worked: run on each target host (shell) or from here (http, tcp_port)."""
    needs: tuple[Need, ...] = ()
    waits: tuple[StepWait, ...] = ()
    approval: bool = False
    """Needs a named approval when it is due, not only its wave's."""
    gates: tuple[StepGate, ...] = ()
    generates: tuple[str, ...] = ()
    """Secrets the product generates for the step and hands to its command on standard input, one
    ``NAME=value`` line each; only their fingerprints are kept."""
    repeatable: bool = False
    """Safe to run again after a failure or an interruption without an operator (idempotent)."""

    @property
    def target_hosts(self) -> tuple[str, ...]:
        return self.action.hosts if isinstance(self.action, ShellAction) else ()

    def gated_hosts(self) -> Mapping[str, Stage]:
        """Each gated host and the earliest stage of it the step gates."""
        found: dict[str, Stage] = {}
        for gate in self.gates:
            for host in gate.hosts:
                current = found.get(host)
                if current is None or GATE_POSITION[gate.before] < GATE_POSITION[current]:
                    found[host] = gate.before
        return found
