"""Generated estates for the benchmarks, built in memory from the sample.

``copies(estate, factor)`` is a group ``factor`` times the sample: each copy has its own sites, pools
and hosts (its own technicians, imaging servers and backup platform), as ten hospital groups would;
hosts depend on hosts of their own copy only. ``pooled(estate, factor)`` is one group with ``factor``
times the hosts and ``factor`` times every pool's capacity, all shared: a stress case where the copies
compete for the same slots.
"""

from __future__ import annotations

from dataclasses import replace

from restore_flows.inventory.estate import Estate, Host
from restore_flows.inventory.models import Pool, Site


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


def copies(estate: Estate, factor: int) -> Estate:
    hosts: dict[str, Host] = {}
    sites: dict[str, Site] = {}
    pools: dict[str, Pool] = {}
    for copy in range(factor):
        suffix = _suffix(copy)
        for name, site in estate.sites.items():
            sites[name + suffix] = site.model_copy(update={"name": name + suffix})
        for name, pool in estate.pools.items():
            pools[name + suffix] = pool.model_copy(update={"name": name + suffix})
        for host in estate.hosts.values():
            hosts[host.name + suffix] = _copy_host(host, suffix, rename_pools=True, rename_site=True)
    return replace(estate, sites=sites, pools=pools, hosts=hosts)


def pooled(estate: Estate, factor: int) -> Estate:
    hosts: dict[str, Host] = {}
    for copy in range(factor):
        suffix = _suffix(copy)
        for host in estate.hosts.values():
            hosts[host.name + suffix] = _copy_host(host, suffix, rename_pools=False, rename_site=False)
    pools = {
        name: pool.model_copy(update={"capacity": pool.capacity * factor})
        for name, pool in estate.pools.items()
    }
    return replace(estate, pools=pools, hosts=hosts)
