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

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from restore_flows.inventory.estate import GATE_POSITION, Estate, Host
from restore_flows.inventory.graph import find_cycles
from restore_flows.inventory.models import (
    Check,
    Procedure,
    RestoreMethod,
    Stage,
    StepGateSpec,
    duration_minutes,
)
from restore_flows.inventory.ranges import RangeError, expand
from restore_flows.inventory.schemacheck import format_path, line_of
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
    wave: str | None = None
    """A wave's gate: its hosts are known once the plan is made (planning fills ``hosts`` in)."""


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


# -- resolution: from the file format (models.Procedure) to ProcedureStep, every reference checked ----

# The placeholders a step's command may use (the loader refuses others before anything runs).
STEP_PLACEHOLDERS = ("host", "address", "step")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # as drivers.commands reads them
_STAGES_OF: Mapping[RestoreMethod, frozenset[Stage]] = {
    RestoreMethod.REIMAGE: frozenset(
        {Stage.EVIDENCE, Stage.WIPE, Stage.REIMAGE, Stage.VERIFY, Stage.RELEASE}
    ),
    RestoreMethod.BACKUP: frozenset({Stage.EVIDENCE, Stage.WIPE, Stage.RESTORE, Stage.VERIFY, Stage.RELEASE}),
}


@dataclass(frozen=True, slots=True)
class WrittenStep:
    """One ``procedures:`` entry as written, with where it was written."""

    model: Procedure
    file: str
    raw: Any
    path: tuple[int | str, ...]

    def where(self, *loc: int | str) -> tuple[str, int, str]:
        line, _ = line_of(self.raw, loc, getattr(self.raw, "line", 1))
        return self.file, line, format_path((*self.path, *loc))

    @property
    def location(self) -> Location:
        return Location(self.file, self.where("name")[1])


Report = Callable[[str, int, str, str], None]


def resolve_steps(
    written: Sequence[WrittenStep], estate: Estate, error: Report, warn: Report
) -> dict[str, ProcedureStep]:
    """Every step with its hosts expanded and its references checked; a step with a mistake is left out
    (the estate is not returned then anyway) and its dependents are not reported again."""
    hosts = estate.hosts
    by_name: dict[str, WrittenStep] = {}
    for item in written:
        name = item.model.name
        if name in by_name:
            error(*item.where("name"), f"duplicate step '{name}' (first at {by_name[name].location})")
        elif name in hosts:
            error(
                *item.where("name"),
                f"step '{name}' has the name of a host ({hosts[name].location}): name it apart",
            )
        else:
            by_name[name] = item
    roles: dict[str, list[str]] = {}
    for host in hosts.values():
        roles.setdefault(host.role, []).append(host.name)
    steps: dict[str, ProcedureStep] = {}
    for name, item in by_name.items():
        step = _resolve_one(item, by_name, estate, roles, error, warn)
        if step is not None:
            steps[name] = step
    _check_cycles(steps, estate, by_name, error)
    return steps


def _expand_hosts(
    pattern: str, hosts: Mapping[str, Host], item: WrittenStep, loc: tuple[int | str, ...], error: Report
) -> list[str] | None:
    try:
        names = expand(pattern)
    except RangeError as exc:
        error(*item.where(*loc), str(exc))
        return None
    missing = [n for n in names if n not in hosts]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        error(*item.where(*loc), f"unknown host '{missing[0]}'{more}")
        return None
    return names


def _resolve_one(
    item: WrittenStep,
    steps: Mapping[str, WrittenStep],
    estate: Estate,
    roles: Mapping[str, list[str]],
    error: Report,
    warn: Report,
) -> ProcedureStep | None:
    model = item.model
    hosts = estate.hosts
    action, ok = _action_of(item, hosts, roles, error)
    needs: list[Need] = []
    named_with_stage: set[str] = set()
    for index, need in enumerate(model.needs):
        if isinstance(need, str):
            if need == model.name:
                error(*item.where("needs", index), f"step '{need}' cannot need itself")
                ok = False
            elif need in steps or need in hosts:
                needs.append(Need(need))
            else:
                error(*item.where("needs", index), f"unknown step or host '{need}'")
                ok = False
            continue
        stage = Stage(need.stage)
        host = hosts.get(need.host)
        if host is None:
            error(*item.where("needs", index, "host"), f"unknown host '{need.host}'")
            ok = False
        elif stage not in _STAGES_OF[host.restore_method]:
            error(
                *item.where("needs", index, "stage"),
                f"{need.host} has no {stage.value} stage (it is restored by {host.restore_method.value})",
            )
            ok = False
        else:
            needs.append(Need(need.host, None if stage is Stage.RELEASE else stage))
            named_with_stage.add(need.host)
    if isinstance(action, ShellAction):
        # A step runs on its hosts once they are online, unless it says which stage it needs.
        known = {n.name for n in needs}
        needs += [Need(h) for h in action.hosts if h not in named_with_stage and h not in known]
    waits: list[StepWait] = []
    for index, wait in enumerate(model.not_before):
        # Written as one mapping or as a list: point at what was written.
        loc: tuple[int | str, ...] = (
            ("not_before", index) if isinstance(item.raw.get("not_before"), list) else ("not_before",)
        )
        if wait.step not in steps:
            error(*item.where(*loc, "step"), f"unknown step '{wait.step}'")
            ok = False
            continue
        waits.append(StepWait(wait.step, duration_minutes(wait.after), wait.reason))
        if wait.step not in {n.name for n in needs}:
            needs.append(Need(wait.step))  # waiting after a step implies needing it done
    gates: list[StepGate] = []
    for index, spec in enumerate(model.gates):
        gate = _gate(spec, estate, roles, item, index, error)
        if gate is None:
            ok = False
        elif not gate.hosts and gate.wave is None:
            warn(*item.where("gates", index), f"{gate.selector} has no hosts: the gate holds nothing")
        else:
            gates.append(gate)
    if not ok or action is None:
        return None
    return ProcedureStep(
        name=model.name,
        action=action,
        minutes=model.minutes,
        location=item.location,
        description=model.description,
        check=model.check,
        needs=tuple(needs),
        waits=tuple(waits),
        approval=model.approval,
        gates=tuple(gates),
        generates=tuple(model.generates),
        repeatable=model.repeatable,
    )


def _action_of(
    item: WrittenStep, hosts: Mapping[str, Host], roles: Mapping[str, list[str]], error: Report
) -> tuple[Action | None, bool]:
    model = item.model
    ok = True
    action: Action | None = None
    if model.http is not None:
        http = model.http
        action = HttpAction(http.url, http.method, http.status, http.timeout, http.body)
        if model.check is not None and model.check.type != "http":
            error(
                *item.where("check", "type"),
                f"a {model.check.type} check needs a host: an http step's check must be http",
            )
            ok = False
    else:
        assert model.runs_on is not None
        assert model.command is not None
        target = model.runs_on
        targets: list[str] | None
        if target.host is not None:
            targets = _expand_hosts(target.host, hosts, item, ("runs_on", "host"), error)
        else:
            assert target.role is not None
            targets = roles.get(target.role)
            if not targets:
                error(*item.where("runs_on", "role"), f"no host has role '{target.role}'")
        if targets is None or not targets:
            ok = False
        else:
            action = ShellAction(tuple(targets), model.command, model.timeout)
        plain = model.command.replace("{{", "").replace("}}", "")  # literal braces, as render() reads them
        unknown = [p for p in _PLACEHOLDER.findall(plain) if p not in STEP_PLACEHOLDERS]
        if unknown:
            error(
                *item.where("command"),
                f"unknown placeholder {{{unknown[0]}}}: a step's command may use "
                + ", ".join(f"{{{p}}}" for p in STEP_PLACEHOLDERS),
            )
            ok = False
    return action, ok


def _gate(
    spec: StepGateSpec,
    estate: Estate,
    roles: Mapping[str, list[str]],
    item: WrittenStep,
    index: int,
    error: Report,
) -> StepGate | None:
    before = Stage(spec.before)
    hosts = estate.hosts
    if spec.wave is not None:
        if spec.wave not in {w.name for w in estate.waves}:
            error(*item.where("gates", index, "wave"), f"unknown wave '{spec.wave}'")
            return None
        # The hosts of a wave are known only once the plan is made: planning fills them in.
        return StepGate(f"wave {spec.wave}", (), before, wave=spec.wave)
    if spec.role is not None:
        if spec.role not in roles:
            error(*item.where("gates", index, "role"), f"no host has role '{spec.role}'")
            return None
        return StepGate(f"role {spec.role}", tuple(roles[spec.role]), before)
    if spec.kind is not None:
        return StepGate(
            f"kind {spec.kind.value}", tuple(n for n, h in hosts.items() if h.kind is spec.kind), before
        )
    if spec.site is not None:
        if spec.site not in estate.sites:
            error(*item.where("gates", index, "site"), f"unknown site '{spec.site}'")
            return None
        return StepGate(
            f"site {spec.site}", tuple(n for n, h in hosts.items() if h.site == spec.site), before
        )
    assert spec.hosts is not None
    names: list[str] = []
    for position, pattern in enumerate(spec.hosts):
        found = _expand_hosts(pattern, hosts, item, ("gates", index, "hosts", position), error)
        if found is None:
            return None
        names += found
    return StepGate("hosts " + ", ".join(spec.hosts), tuple(dict.fromkeys(names)), before)


def check_planned_cycles(planned: Estate, written: Sequence[WrittenStep], error: Report) -> None:
    """The cycle check again once the plan has filled in each wave gate's hosts: a step that needs a
    host of a wave it gates (before that host's stage it needs) can never start, and only the plan
    says which hosts a wave holds. Run on an estate with no other cycle: any found is through a gate."""
    by_name = {item.model.name: item for item in written}
    _check_cycles(planned.procedures, planned, by_name, error, " (through a wave's gate)")


def _check_cycles(
    steps: Mapping[str, ProcedureStep],
    estate: Estate,
    written: Mapping[str, WrittenStep],
    error: Report,
    said: str = "",
) -> None:
    """A step that needs, through hosts and stages, something it gates can never start."""
    edges: dict[str, list[str]] = {}
    gated_by: dict[str, list[tuple[str, Stage]]] = {}
    for step in steps.values():
        edges[step.name] = [need.key for need in step.needs]
        for host, stage in step.gated_hosts().items():
            gated_by.setdefault(host, []).append((step.name, stage))
    involved = {n.name for s in steps.values() for n in s.needs if n.name in estate.hosts}
    involved |= set(gated_by)
    # Walk the hosts reachable from the steps: a host online needs its dependencies and its gates;
    # a stage of a host needs the gates on that stage or earlier.
    todo = list(involved)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in estate.hosts:
            continue
        seen.add(name)
        this = estate.hosts[name]
        gates = gated_by.get(name, [])
        edges[name] = [*this.depends_on, *(s for s, _ in gates)]
        for stage in Stage:
            key = milestone(name, stage)
            position = GATE_POSITION[stage]
            edges[key] = [s for s, g in gates if GATE_POSITION[g] <= position] + [
                d for d in this.depends_on if GATE_POSITION[this.gate_of(d)] <= position
            ]
        todo += this.depends_on
    for cycle in find_cycles(edges):
        first = next((n for n in cycle if n in written), None)
        if first is None:
            continue  # between hosts only: the host checks report it
        error(*written[first].where("needs"), "cycle between steps and hosts: " + " -> ".join(cycle) + said)
