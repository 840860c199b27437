"""How long each stage of a host takes, in minutes: planned, then learned from the ledger.

The planned minutes are the inventory's ``durations`` where given, else the defaults below (what
hospital IT teams report for a rebuild). Once stages have finished, the median of what was observed
for the host's role and stage replaces the plan; for a role and stage not yet seen, the plan is scaled
by the median ratio of observed to planned time over everything seen so far (a time-scaled rehearsal
runs at a fraction of the plan, a slow site above it).

=========  ======  ===========  ===================================================================
stage      server  workstation  why
=========  ======  ===========  ===================================================================
evidence   45      20           disk image plus memory dump to the forensic store
wipe       20      10           secure erase of SSD/NVMe, boot media replaced
reimage    40      25           PXE boot, golden image, domain join, first-boot configuration
restore    60      n/a          VM restore from the last clean backup (backup streams are the limit)
verify     10      5            image id, services, EDR agent, IOC scan
release    2       1            move from the quarantine VLAN to production
=========  ======  ===========  ===================================================================
"""

from __future__ import annotations

import hashlib
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import HostKind, RestoreMethod, Stage

DEFAULT_MINUTES: Mapping[Stage, tuple[float, float]] = {
    Stage.EVIDENCE: (45, 20),
    Stage.WIPE: (20, 10),
    Stage.REIMAGE: (40, 25),
    Stage.RESTORE: (60, 60),
    Stage.VERIFY: (10, 5),
    Stage.RELEASE: (2, 1),
}


def planned_minutes(host: Host, stage: Stage) -> float:
    override = host.durations.get(stage)
    if override is not None:
        return override
    server, workstation = DEFAULT_MINUTES[stage]
    return server if host.kind is HostKind.SERVER else workstation


def pipeline(host: Host) -> tuple[Stage, ...]:
    """Every stage of the host's restore, in order."""
    rebuild = Stage.RESTORE if host.restore_method is RestoreMethod.BACKUP else Stage.REIMAGE
    stages = (Stage.WIPE, rebuild, Stage.VERIFY, Stage.RELEASE)
    return (Stage.EVIDENCE, *stages) if host.forensic_hold else stages


@dataclass(frozen=True, slots=True)
class Observation:
    """One finished stage attempt, from the ledger."""

    host: str
    stage: Stage
    seconds: float


@dataclass
class Durations:
    """Minutes per host and stage: observed medians per role and stage, else the plan at the pace seen."""

    medians: Mapping[tuple[str, Stage], float] = field(default_factory=dict)
    """(role, stage) -> median observed minutes."""
    pace: float = 1.0
    """Observed minutes per planned minute, over every observation: scales the plan where no
    observation of the role and stage exists yet."""

    def minutes(self, host: Host, stage: Stage) -> float:
        observed = self.medians.get((host.role, stage))
        if observed is not None:
            return observed
        return planned_minutes(host, stage) * self.pace

    @classmethod
    def learned(
        cls, hosts: Mapping[str, Host], observations: Iterable[Observation], default_pace: float = 1.0
    ) -> Durations:
        """From finished attempts; ``default_pace`` scales the plan while nothing was observed."""
        per: dict[tuple[str, Stage], list[float]] = defaultdict(list)
        ratios: list[float] = []
        for seen in observations:
            host = hosts.get(seen.host)
            if host is None:
                continue
            minutes = seen.seconds / 60.0
            per[(host.role, seen.stage)].append(minutes)
            planned = planned_minutes(host, seen.stage)
            if planned > 0:
                ratios.append(minutes / planned)
        return cls(
            medians={key: statistics.median(values) for key, values in per.items()},
            pace=statistics.median(ratios) if ratios else default_pace,
        )


PLANNED = Durations()
"""The inventory's plan, nothing observed."""


def draw(*key: object) -> float:
    """A number in [0, 1) fixed by ``key``: seeded draws that do not depend on timing or order.

    A hash rather than a generator seeded per draw: a tenth of the cost, and the same numbers with
    every Python (a rehearsal replayed elsewhere fails the same hosts)."""
    digest = hashlib.sha256(":".join(str(part) for part in key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
