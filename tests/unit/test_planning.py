"""The planner's rules, on small estates written as YAML the way engineers write them."""

from __future__ import annotations

from pathlib import Path

from restore_flows.inventory.loader import load_estate
from restore_flows.planning import MAX_CHAIN_SHOWN, Plan, plan
from tests.conftest import WriteInventory

WAVES = """
waves:
  - {name: core, services: [identity, dns]}
  - {name: icu, services: [icu, monitoring]}
  - {name: lab, services: [lab]}
  - {name: rest, services: ["*"]}
sites:
  - {name: dc1, kind: datacenter}
  - {name: arl, kind: hospital}
  - {name: brg, kind: hospital}
roles:
  - {name: srv, kind: server}
  - {name: ws, kind: workstation}
"""


def _plan(write_inventory: WriteInventory, hosts: str) -> Plan:
    directory: Path = write_inventory(base=WAVES, hosts=hosts)
    return plan(load_estate(directory))


def test_own_wave_is_earliest_of_services(write_inventory: WriteInventory) -> None:
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: a, role: srv, site: arl, services: [lab, icu]}
          - {name: b, role: srv, site: arl, services: [files]}
          - {name: c, role: srv, site: arl, services: [dns]}
        """,
    )
    assert the_plan.hosts["a"].wave == "icu"
    assert the_plan.hosts["b"].wave == "rest"
    assert the_plan.hosts["c"].wave == "core"
    assert all(p.pulled_forward_by is None for p in the_plan.hosts.values())


def test_pull_forward_chain_is_transitive(write_inventory: WriteInventory) -> None:
    # ws (icu) -> gw (lab) -> db (files, catch-all) -> dc (core): gw and db are pulled into icu.
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: ws-1, role: ws, site: arl, services: [icu], depends_on: [gw]}
          - {name: gw, role: srv, site: arl, services: [lab], depends_on: [db]}
          - {name: db, role: srv, site: dc1, services: [files], depends_on: [dc]}
          - {name: dc, role: srv, site: dc1, services: [identity]}
        """,
    )
    hosts = the_plan.hosts
    assert (hosts["gw"].wave, hosts["gw"].own_wave, hosts["gw"].pulled_forward_by) == (
        "icu",
        "lab",
        "ws-1",
    )
    assert (hosts["db"].wave, hosts["db"].own_wave, hosts["db"].pulled_forward_by) == (
        "icu",
        "rest",
        "gw",
    )
    assert hosts["db"].pulled_forward_chain == ("gw", "ws-1")
    # dc's own wave (core) is already earlier: it is not pulled anywhere.
    assert hosts["dc"].wave == "core"
    assert hosts["dc"].pulled_forward_by is None
    assert the_plan.wave("icu").hosts == ("db", "gw", "ws-1")


def test_diamond_dependency_takes_earliest_dependent(write_inventory: WriteInventory) -> None:
    #      lab-ws (lab)   icu-ws (icu)
    #            \        /
    #           app-a  app-b      (both catch-all)
    #               \   /
    #               shared        (catch-all)
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: lab-ws, role: ws, site: arl, services: [lab], depends_on: [app-a]}
          - {name: icu-ws, role: ws, site: arl, services: [icu], depends_on: [app-b]}
          - {name: app-a, role: srv, site: dc1, services: [x], depends_on: [shared]}
          - {name: app-b, role: srv, site: dc1, services: [x], depends_on: [shared]}
          - {name: shared, role: srv, site: dc1, services: [x]}
        """,
    )
    hosts = the_plan.hosts
    assert hosts["app-a"].wave == "lab"
    assert hosts["app-b"].wave == "icu"
    assert hosts["shared"].wave == "icu"
    assert hosts["shared"].pulled_forward_by == "app-b"
    assert hosts["shared"].pulled_forward_chain == ("app-b", "icu-ws")


def test_tie_between_dependents_in_same_wave_is_by_name(write_inventory: WriteInventory) -> None:
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: z-ws, role: ws, site: arl, services: [icu], depends_on: [app]}
          - {name: a-ws, role: ws, site: arl, services: [icu], depends_on: [app]}
          - {name: app, role: srv, site: dc1, services: [x]}
        """,
    )
    assert the_plan.hosts["app"].pulled_forward_by == "a-ws"


def test_cross_site_dependency_is_ordered_first(write_inventory: WriteInventory) -> None:
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: gw-brg, role: srv, site: brg, services: [icu], depends_on: [gw-arl]}
          - {name: gw-arl, role: srv, site: arl, services: [monitoring]}
        """,
    )
    icu = the_plan.wave("icu")
    assert icu.hosts.index("gw-arl") < icu.hosts.index("gw-brg")
    # gw-arl is in icu by its own service, not pulled.
    assert the_plan.hosts["gw-arl"].pulled_forward_by is None


def test_tie_break_service_priority_then_servers_then_name(
    write_inventory: WriteInventory,
) -> None:
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: a-ws, role: ws, site: arl, services: [monitoring]}
          - {name: b-srv, role: srv, site: arl, services: [monitoring]}
          - {name: c-ws, role: ws, site: arl, services: [icu]}
          - {name: d-srv, role: srv, site: arl, services: [icu]}
          - {name: e-srv, role: srv, site: arl, services: [icu]}
        """,
    )
    # icu is listed before monitoring in the wave: its hosts go first; servers before workstations.
    assert the_plan.wave("icu").hosts == ("d-srv", "e-srv", "c-ws", "b-srv", "a-ws")


def test_dependency_order_overrides_priority(write_inventory: WriteInventory) -> None:
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: a, role: ws, site: arl, services: [icu], depends_on: [z]}
          - {name: z, role: srv, site: arl, services: [monitoring]}
        """,
    )
    assert the_plan.wave("icu").hosts == ("z", "a")


def test_catch_all_takes_unlisted_services_and_hosts_without_services(
    write_inventory: WriteInventory,
) -> None:
    the_plan = _plan(
        write_inventory,
        """
        hosts:
          - {name: p, role: srv, site: arl, services: [printing]}
          - {name: q, role: srv, site: arl}
        """,
    )
    assert the_plan.wave("rest").hosts == ("p", "q")


def test_json_shape(write_inventory: WriteInventory) -> None:
    the_plan = _plan(
        write_inventory,
        """
        groups:
          - defaults: {role: ws, site: arl, services: [icu], depends_on: ["gw-{site}"]}
            hosts:
              - name: ws-icu-arl-[001:002]
        hosts:
          - {name: gw-arl, role: srv, site: arl, services: [files]}
        """,
    )
    data = the_plan.to_json()
    assert [w["name"] for w in data["waves"]] == ["core", "icu", "lab", "rest"]
    assert data["waves"][1]["hosts"] == ["gw-arl", "ws-icu-arl-001", "ws-icu-arl-002"]
    assert data["hosts"]["ws-icu-arl-001"] == {
        "wave": "icu",
        "own_wave": "icu",
        "kind": "workstation",
        "site": "arl",
        "role": "ws",
        "department": "ws",
        "services": ["icu"],
        "depends_on": ["gw-arl"],
        "dependencies": [{"host": "gw-arl", "before": "verify"}],
        "restore_method": "reimage",
        "forensic_hold": False,
        "pulled_forward_by": None,
        "pulled_forward_chain": [],
        "pulled_forward_depth": 0,
    }
    assert data["hosts"]["gw-arl"]["pulled_forward_by"] == "ws-icu-arl-001"
    assert data["waves"][1]["counts"]["kind"] == {"server": 1, "workstation": 2}


def test_a_long_chain_is_planned_in_linear_space(write_inventory: WriteInventory) -> None:
    """Each host of a 5,000-host chain is pulled forward by the next; its chain is shown bounded (the
    first links and the host that set the pace), with its full length, instead of 5,000^2 names."""
    length = 5000
    lines = ["hosts:", "  - {name: h-0000, role: srv, site: dc1}"]
    for index in range(1, length):
        services = ", services: [icu]" if index == length - 1 else ""
        lines.append(
            f"  - {{name: h-{index:04d}, role: srv, site: dc1{services}, depends_on: [h-{index - 1:04d}]}}"
        )
    the_plan = _plan(write_inventory, "\n".join(lines))
    last = f"h-{length - 1:04d}"
    first = the_plan.hosts["h-0000"]
    assert first.wave == "icu"
    assert first.pulled_forward_by == "h-0001"
    assert first.pulled_forward_depth == length - 1
    assert first.pulled_forward_chain == (*(f"h-{i:04d}" for i in range(1, MAX_CHAIN_SHOWN)), last)
    near = the_plan.hosts[f"h-{length - 3:04d}"]
    assert near.pulled_forward_chain == (f"h-{length - 2:04d}", last)
    assert near.pulled_forward_depth == 2
    assert sum(len(p.pulled_forward_chain) for p in the_plan.hosts.values()) <= MAX_CHAIN_SHOWN * length
