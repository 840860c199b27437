"""The restore plan: which wave each host is restored in, and in what order. Pure: estate in, plan out.

Rules:

* A host's own wave is the earliest wave that lists one of its services; a host whose services are in no
  wave (or that has none) goes to the catch-all wave.
* A dependency must be online before the stage of its dependent that needs it (``Host.gates``: by
  default verification for a reimaged host, the restore for a host restored from backup), so it is
  *pulled forward* into the wave of its earliest dependent, transitively. The plan records which
  dependent pulled it (``pulled_forward_by``) and the chain up to the host whose own wave set the pace.
* Within a wave, hosts are in a valid start order (dependencies first); among hosts free to go, the one
  whose service comes first in the wave's list goes first, then servers before workstations, then by name.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from restore_flows.inventory.estate import Estate, Host
from restore_flows.inventory.models import CATCH_ALL, HostKind
from restore_flows.inventory.procedures import ShellAction

MAX_CHAIN_SHOWN = 8


@dataclass(frozen=True, slots=True)
class PlannedHost:
    name: str
    wave: str
    own_wave: str
    """The wave its services alone would put it in."""
    pulled_forward_by: str | None
    """The dependent that pulled it into an earlier wave, or None."""
    pulled_forward_chain: tuple[str, ...]
    """From the direct dependent to the host whose own wave it is: why it moved. A long chain keeps its
    first ``MAX_CHAIN_SHOWN - 1`` links and that last host (``pulled_forward_depth`` counts them all):
    written out in full, a chain of n hosts costs n^2 (2,000 hosts, 45 MB of plan)."""
    pulled_forward_depth: int = 0
    """The links of the whole chain."""


@dataclass(frozen=True, slots=True)
class PlannedWave:
    name: str
    services: tuple[str, ...]
    hosts: tuple[str, ...]
    """In start order."""


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """A procedure step's place in the plan: the earliest wave that waits for it."""

    name: str
    wave: str
    pulled_forward_by: str | None = None
    """The host (or step) of an earlier wave that waits for it, or None."""


@dataclass(frozen=True, slots=True)
class Plan:
    estate: Estate
    waves: tuple[PlannedWave, ...]
    hosts: Mapping[str, PlannedHost]
    steps: Mapping[str, PlannedStep] = field(default_factory=dict)
    """Procedure steps by name, in the order written."""

    def wave_of(self, name: str) -> str:
        """The wave of a host or of a procedure step."""
        planned = self.hosts.get(name)
        return planned.wave if planned is not None else self.steps[name].wave

    def wave(self, name: str) -> PlannedWave:
        for wave in self.waves:
            if wave.name == name:
                return wave
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """The plan as ``restore plan --json`` prints it."""
        hosts = self.estate.hosts
        return {
            "waves": [
                {
                    "name": wave.name,
                    "services": list(wave.services),
                    "hosts": list(wave.hosts),
                    "counts": summarize(wave, hosts),
                }
                for wave in self.waves
            ],
            "hosts": {
                name: {
                    "wave": planned.wave,
                    "own_wave": planned.own_wave,
                    "kind": hosts[name].kind.value,
                    "site": hosts[name].site,
                    "role": hosts[name].role,
                    "department": hosts[name].department,
                    "services": list(hosts[name].services),
                    "depends_on": list(hosts[name].depends_on),
                    "dependencies": [
                        {"host": dependency, "before": hosts[name].gate_of(dependency).value}
                        for dependency in hosts[name].depends_on
                    ],
                    "restore_method": hosts[name].restore_method.value,
                    "forensic_hold": hosts[name].forensic_hold,
                    "pulled_forward_by": planned.pulled_forward_by,
                    "pulled_forward_chain": list(planned.pulled_forward_chain),
                    "pulled_forward_depth": planned.pulled_forward_depth,
                }
                for wave in self.waves
                for name in wave.hosts
                for planned in (self.hosts[name],)
            },
            "procedures": [self._step_json(name) for name in self.steps],
        }

    def _step_json(self, name: str) -> dict[str, Any]:
        step = self.estate.procedures[name]
        action = step.action
        return {
            "name": name,
            "wave": self.steps[name].wave,
            "description": step.description,
            "runs_on": list(action.hosts) if isinstance(action, ShellAction) else None,
            "http": None if isinstance(action, ShellAction) else f"{action.method} {action.url}",
            "needs": [{"host": n.name, "stage": n.stage.value} if n.stage else n.name for n in step.needs],
            "not_before": [
                {"step": w.step, "after_minutes": w.minutes, "reason": w.reason} for w in step.waits
            ],
            "gates": [
                {"selector": g.selector, "before": g.before.value, "hosts": len(g.hosts)} for g in step.gates
            ],
            "approval": step.approval,
            "minutes": step.minutes,
            "generates": list(step.generates),
            "repeatable": step.repeatable,
            "pulled_forward_by": self.steps[name].pulled_forward_by,
        }


def summarize(wave: PlannedWave, hosts: Mapping[str, Host]) -> dict[str, dict[str, int]]:
    """Counts of a wave's hosts by site, kind, service and department."""
    by_site: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    by_service: Counter[str] = Counter()
    by_department: Counter[str] = Counter()
    for name in wave.hosts:
        host = hosts[name]
        by_site[host.site] += 1
        by_kind[host.kind.value] += 1
        by_department[host.department] += 1
        by_service.update(host.services or ("(none)",))
    return {
        "site": dict(sorted(by_site.items())),
        "kind": dict(sorted(by_kind.items())),
        "service": dict(sorted(by_service.items())),
        "department": dict(sorted(by_department.items())),
    }


def plan(estate: Estate) -> Plan:
    """Plan the estate. The estate must be valid (no cycles, no unknown references)."""
    waves = estate.waves
    service_wave = estate.wave_of_service()
    catch_all = service_wave.get(CATCH_ALL, len(waves) - 1)
    hosts = estate.hosts

    own, depends_on = _graph(estate, catch_all)

    dependents: dict[str, list[str]] = {name: [] for name in depends_on}
    for name, dependencies in depends_on.items():
        for dependency in dependencies:
            dependents[dependency].append(name)

    # Dependents before their dependencies (Kahn's algorithm over "is depended on by"), so that a
    # host's wave is final before it is pushed down to what it depends on.
    assigned = dict(own)
    pulled_by: dict[str, str] = {}
    waiting = {name: len(dependents[name]) for name in depends_on}
    ready = [name for name, count in waiting.items() if count == 0]
    while ready:
        name = ready.pop()
        wave = assigned[name]
        for dependency in depends_on[name]:
            current = assigned[dependency]
            better = wave < current or (
                wave == current and dependency in pulled_by and name < pulled_by[dependency]
            )
            if better and wave < own[dependency]:
                assigned[dependency] = wave
                pulled_by[dependency] = name
            waiting[dependency] -= 1
            if waiting[dependency] == 0:
                ready.append(dependency)
    if any(count > 0 for count in waiting.values()):
        raise ValueError("dependency cycle: validate the inventory before planning")

    roots = _chain_roots(pulled_by)
    planned_hosts: dict[str, PlannedHost] = {}
    for name in hosts:
        chain: list[str] = []
        cursor = pulled_by.get(name)
        while cursor is not None and len(chain) < MAX_CHAIN_SHOWN:
            chain.append(cursor)
            cursor = pulled_by.get(cursor)
        root, depth = roots.get(name, ("", 0))
        if depth > len(chain):
            chain[-1] = root
        planned_hosts[name] = PlannedHost(
            name=name,
            wave=waves[assigned[name]].name,
            own_wave=waves[own[name]].name,
            pulled_forward_by=pulled_by.get(name),
            pulled_forward_chain=tuple(chain),
            pulled_forward_depth=depth,
        )

    members: list[list[str]] = [[] for _ in waves]
    for name in hosts:
        members[assigned[name]].append(name)
    planned_waves = tuple(
        PlannedWave(
            name=wave.name,
            services=tuple(wave.services),
            hosts=_start_order(members[index], hosts, wave.services),
        )
        for index, wave in enumerate(waves)
    )
    steps = {
        name: PlannedStep(name, waves[assigned[name]].name, pulled_by.get(name)) for name in estate.procedures
    }
    return Plan(
        estate=_with_wave_gates(estate, planned_waves), waves=planned_waves, hosts=planned_hosts, steps=steps
    )


def _graph(estate: Estate, catch_all: int) -> tuple[dict[str, int], dict[str, Sequence[str]]]:
    """Each host's and step's own wave (by its services; a step by its gates), and what each depends on."""
    waves = estate.waves
    service_wave = estate.wave_of_service()
    hosts = estate.hosts
    own: dict[str, int] = {}
    for name, host in hosts.items():
        listed = [service_wave[s] for s in host.services if s in service_wave]
        own[name] = min(listed) if listed else catch_all
    wave_index = {wave.name: index for index, wave in enumerate(waves)}
    # Procedure steps are nodes too: a step is a dependency of what it gates and depends on what it
    # needs, so the hosts it needs are pulled into the wave of the first host that waits for it.
    depends_on: dict[str, Sequence[str]] = {name: host.depends_on for name, host in hosts.items()}
    for step in estate.procedures.values():
        depends_on[step.name] = tuple(dict.fromkeys(need.name for need in step.needs))
        # A wave's gate: its hosts are not known yet; the step must be done by that wave.
        own[step.name] = min((wave_index[g.wave] for g in step.gates if g.wave), default=catch_all)
    for step in estate.procedures.values():
        needed = {need.name for need in step.needs}
        for gated in step.gated_hosts():
            if gated in needed:
                # It needs an earlier stage of the host it gates (the DC it cleans up before release):
                # no cycle, but the step belongs to that host's wave at the latest.
                own[step.name] = min(own[step.name], own[gated])
            else:
                depends_on[gated] = (*depends_on[gated], step.name)
    return own, depends_on


def _with_wave_gates(estate: Estate, waves: Sequence[PlannedWave]) -> Estate:
    """The estate with each wave gate's hosts filled in from the plan."""
    if not any(g.wave for step in estate.procedures.values() for g in step.gates):
        return estate
    members = {wave.name: wave.hosts for wave in waves}
    procedures = {
        name: replace(
            step,
            gates=tuple(replace(g, hosts=members[g.wave]) if g.wave else g for g in step.gates),
        )
        for name, step in estate.procedures.items()
    }
    return replace(estate, procedures=procedures)


def _chain_roots(pulled_by: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """For each pulled host, the end of its chain and the chain's length, in time linear in the hosts:
    each host's answer is its puller's, one link longer."""
    found: dict[str, tuple[str, int]] = {}
    for start in pulled_by:
        path: list[str] = []
        cursor = start
        while cursor in pulled_by and cursor not in found:
            path.append(cursor)
            cursor = pulled_by[cursor]
        root, depth = found.get(cursor, (cursor, 0))
        for name in reversed(path):
            depth += 1
            found[name] = (root, depth)
    return found


def _start_order(names: list[str], hosts: Mapping[str, Host], services: list[str]) -> tuple[str, ...]:
    """Topological order inside one wave, ties broken by service priority, kind, then name."""
    priority = {service: index for index, service in enumerate(services) if service != CATCH_ALL}
    unlisted = len(services)
    inside = set(names)

    def key(name: str) -> tuple[int, int, str]:
        host = hosts[name]
        rank = min((priority[s] for s in host.services if s in priority), default=unlisted)
        return (rank, 0 if host.kind is HostKind.SERVER else 1, name)

    blocking = {name: sum(1 for d in hosts[name].depends_on if d in inside) for name in names}
    dependents: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for dependency in hosts[name].depends_on:
            if dependency in inside:
                dependents[dependency].append(name)
    heap = [(key(name), name) for name, count in blocking.items() if count == 0]
    heapq.heapify(heap)
    order: list[str] = []
    while heap:
        _, name = heapq.heappop(heap)
        order.append(name)
        for dependent in dependents[name]:
            blocking[dependent] -= 1
            if blocking[dependent] == 0:
                heapq.heappush(heap, (key(dependent), dependent))
    if len(order) != len(names):
        raise ValueError("dependency cycle: validate the inventory before planning")
    return tuple(order)
