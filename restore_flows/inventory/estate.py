"""The estate: the merged, resolved, validated inventory. Every host here is complete.

Plain frozen dataclasses rather than pydantic models: the loader builds up to hundreds of thousands of
hosts from already-validated parts, and re-validating each one would double the load time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from restore_flows.inventory.models import (
    CATCH_ALL,
    Bmc,
    Check,
    Drivers,
    HostKind,
    Pool,
    RestoreMethod,
    Site,
    Ssh,
    Stage,
    Wave,
)
from restore_flows.inventory.yamlsource import Location

if TYPE_CHECKING:  # procedures.py reads GATE_POSITION from here
    from restore_flows.inventory.procedures import ProcedureStep


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    kind: HostKind
    site: str
    role: str
    department: str
    services: tuple[str, ...]
    depends_on: tuple[str, ...]
    """Expanded host names, in the order written."""
    pools: Mapping[Stage, tuple[str, ...]]
    """Pool names per stage, with '{site}' filled in."""
    restore_method: RestoreMethod
    forensic_hold: bool
    location: Location
    golden_image: str | None = None
    address: str | None = None
    mac: str | None = None
    bmc: Bmc | None = None
    ssh: Ssh | None = None
    drivers: Drivers = field(default_factory=Drivers)
    checks: tuple[Check, ...] = ()
    durations: Mapping[Stage, float] = field(default_factory=dict)
    """Expected minutes per stage where the inventory says; the fleet's defaults otherwise."""
    description: str | None = None
    gates: Mapping[str, Stage] = field(default_factory=dict)
    """For each dependency, the stage of this host that may start only once it is online (the loader
    fills it for every dependency; one missing here gates the default stage, see ``gate_of``)."""

    def gate_of(self, dependency: str) -> Stage:
        return self.gates.get(dependency) or default_gate(self.restore_method)


# Where a stage sits in a host's pipeline, for gating: the rebuild is one position, by reimage or restore.
GATE_POSITION: Mapping[Stage, int] = {
    Stage.EVIDENCE: 0,
    Stage.WIPE: 1,
    Stage.REIMAGE: 2,
    Stage.RESTORE: 2,
    Stage.VERIFY: 3,
    Stage.RELEASE: 4,
}


def default_gate(method: RestoreMethod) -> Stage:
    """The stage dependencies gate unless the inventory says otherwise.

    A reimaged host needs nothing of the estate to be wiped and to receive its image: its checks,
    domain membership and production use need its dependencies, so they gate verification. A host
    restored from backup needs its hypervisor and backup server for the restore itself.
    """
    return Stage.RESTORE if method is RestoreMethod.BACKUP else Stage.VERIFY


@dataclass(frozen=True, slots=True)
class Estate:
    waves: tuple[Wave, ...]
    sites: Mapping[str, Site]
    pools: Mapping[str, Pool]
    hosts: Mapping[str, Host]
    """In the order the files list them (files sorted by path)."""
    procedures: Mapping[str, ProcedureStep] = field(default_factory=dict)
    """Procedure steps by name, in the order written."""

    def wave_of_service(self) -> dict[str, int]:
        """Service name -> index of the wave that lists it; '*' maps to the catch-all wave."""
        index: dict[str, int] = {}
        for position, wave in enumerate(self.waves):
            for service in wave.services:
                index.setdefault(service, position)
        return index

    @property
    def catch_all(self) -> int | None:
        return self.wave_of_service().get(CATCH_ALL)
