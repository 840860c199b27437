"""How long the remaining work will take: planned minutes per stage, pools, observed speed. Pure.

The planned minutes per stage are the inventory's ``durations`` where given, else the defaults below
(what hospital IT teams report for a rebuild). The estimate is the remaining work's lower bound, the
busiest pool's work divided by its capacity or all work divided by the workers, scaled by how fast
work has actually gone so far (seconds observed per planned minute). It improves as stages finish.

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

from collections import defaultdict
from collections.abc import Iterable, Mapping

from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import HostKind, Pool, RestoreMethod, Stage

DEFAULT_MINUTES: Mapping[Stage, tuple[float, float]] = {
    Stage.EVIDENCE: (45, 20),
    Stage.WIPE: (20, 10),
    Stage.REIMAGE: (40, 25),
    Stage.RESTORE: (60, 60),
    Stage.VERIFY: (10, 5),
    Stage.RELEASE: (2, 1),
}


def stage_minutes(host: Host, stage: Stage) -> float:
    override = host.durations.get(stage)
    if override is not None:
        return override
    server, workstation = DEFAULT_MINUTES[stage]
    return server if host.kind is HostKind.SERVER else workstation


def planned_stages(host: Host) -> list[Stage]:
    rebuild = Stage.RESTORE if host.restore_method is RestoreMethod.BACKUP else Stage.REIMAGE
    stages = [Stage.WIPE, rebuild, Stage.VERIFY, Stage.RELEASE]
    return [Stage.EVIDENCE, *stages] if host.forensic_hold else stages


def bound_minutes(hosts: Iterable[Host], pools: Mapping[str, Pool], workers: int) -> float:
    """Planned minutes the hosts' work needs at least: busiest pool, or everything over the workers."""
    total = 0.0
    per_pool: dict[str, float] = defaultdict(float)
    for host in hosts:
        for stage in planned_stages(host):
            minutes = stage_minutes(host, stage)
            total += minutes
            for pool in host.pools.get(stage, ()):
                per_pool[pool] += minutes
    candidates = [total / max(workers, 1)]
    candidates += [work / pools[name].capacity for name, work in per_pool.items() if name in pools]
    return max(candidates)


def eta_seconds(
    done: Iterable[Host],
    remaining: Iterable[Host],
    pools: Mapping[str, Pool],
    workers: int,
    elapsed_seconds: float,
) -> float | None:
    """Seconds until the remaining hosts are done, or None before anything finished to learn from."""
    remaining_list = list(remaining)
    if not remaining_list:
        return 0.0
    done_minutes = bound_minutes(done, pools, workers)
    if done_minutes <= 0 or elapsed_seconds <= 0:
        return None
    return bound_minutes(remaining_list, pools, workers) * (elapsed_seconds / done_minutes)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "after the first hosts are done"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def observed_pace(
    estate_hosts: Mapping[str, Host], attempts: Iterable[tuple[str, str, float]]
) -> float | None:
    """Seconds of real time per planned minute over finished attempts; None if none finished."""
    seconds = 0.0
    planned = 0.0
    for host, stage, took in attempts:
        if host in estate_hosts:
            seconds += took
            planned += stage_minutes(estate_hosts[host], Stage(stage))
    return seconds / planned if planned > 0 else None


def wave_etas(
    estate_hosts: Mapping[str, Host],
    pools: Mapping[str, Pool],
    remaining_by_wave: Mapping[str, list[str]],
    pace: float | None,
    workers: int,
) -> dict[str, float | None]:
    """Per wave: seconds to finish its remaining hosts at the observed pace (None before any)."""
    return {
        wave: (
            0.0
            if not names
            else None
            if pace is None
            else bound_minutes([estate_hosts[n] for n in names], pools, workers) * pace
        )
        for wave, names in remaining_by_wave.items()
    }
