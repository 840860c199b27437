"""Generated estates for the benchmarks, built in memory from the sample.

``copies(estate, factor)`` is a group ``factor`` times the sample: each copy has its own sites, pools
and hosts (its own technicians, imaging servers and backup platform), as ten hospital groups would;
hosts depend on hosts of their own copy only, and each copy has its own procedure steps (its own forest
to recover). ``pooled(estate, factor)`` is one group with ``factor``
times the hosts and ``factor`` times every pool's capacity, all shared: a stress case where the copies
compete for the same slots.
"""

from __future__ import annotations

from dataclasses import replace

from restore_flows.inventory.estate import Estate, Host
from restore_flows.inventory.models import Pool, Site
from restore_flows.inventory.procedures import Need, ProcedureStep, ShellAction, StepWait
from restore_flows.planning import plan


def _suffix(copy: int) -> str:
    return "" if copy == 0 else f"-r{copy}"


def _copy_host(host: Host, suffix: str, rename_pools: bool, rename_site: bool) -> Host:
    pools = {
        stage: tuple(f"{p}{suffix}" if rename_pools else p for p in names)
        for stage, names in host.pools.items()
    }
    return replace(
        host,
        name=host.name + suffix,
        site=host.site + suffix if rename_site else host.site,
        depends_on=tuple(d + suffix for d in host.depends_on),
        gates={d + suffix: gate for d, gate in host.gates.items()},
        pools=pools,
    )


def _copy_steps(estate: Estate, suffix: str) -> dict[str, ProcedureStep]:
    """The procedure steps of one copy: their own names, hosts and needs. A wave's gate becomes a gate
    on that copy's hosts of the wave (planning would otherwise give it every copy's)."""
    members = {wave.name: wave.hosts for wave in plan(estate).waves}
    steps: dict[str, ProcedureStep] = {}
    for step in estate.procedures.values():
        action = step.action
        if isinstance(action, ShellAction):
            action = replace(action, hosts=tuple(h + suffix for h in action.hosts))
        gates = tuple(
            replace(
                gate,
                hosts=tuple(h + suffix for h in (members[gate.wave] if gate.wave else gate.hosts)),
                wave=None,
            )
            for gate in step.gates
        )
        steps[step.name + suffix] = replace(
            step,
            name=step.name + suffix,
            action=action,
            needs=tuple(Need(n.name + suffix, n.stage) for n in step.needs),
            waits=tuple(StepWait(w.step + suffix, w.minutes, w.reason) for w in step.waits),
            gates=gates,
        )
    return steps


def copies(estate: Estate, factor: int) -> Estate:
    hosts: dict[str, Host] = {}
    sites: dict[str, Site] = {}
    pools: dict[str, Pool] = {}
    steps: dict[str, ProcedureStep] = {}
    for copy in range(factor):
        suffix = _suffix(copy)
        for name, site in estate.sites.items():
            sites[name + suffix] = site.model_copy(update={"name": name + suffix})
        for name, pool in estate.pools.items():
            pools[name + suffix] = pool.model_copy(update={"name": name + suffix})
        for host in estate.hosts.values():
            hosts[host.name + suffix] = _copy_host(host, suffix, rename_pools=True, rename_site=True)
        steps.update(_copy_steps(estate, suffix))
    return replace(estate, sites=sites, pools=pools, hosts=hosts, procedures=steps)


def pooled(estate: Estate, factor: int) -> Estate:
    hosts: dict[str, Host] = {}
    steps: dict[str, ProcedureStep] = {}
    for copy in range(factor):
        suffix = _suffix(copy)
        for host in estate.hosts.values():
            hosts[host.name + suffix] = _copy_host(host, suffix, rename_pools=False, rename_site=False)
        steps.update(_copy_steps(estate, suffix))
    pools = {
        name: pool.model_copy(update={"capacity": pool.capacity * factor})
        for name, pool in estate.pools.items()
    }
    return replace(estate, pools=pools, hosts=hosts, procedures=steps)
