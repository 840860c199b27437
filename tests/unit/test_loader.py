"""Loading: merging files, defaults from groups and roles, ranges and '{site}'."""

from __future__ import annotations

from pathlib import Path

import pytest

from restore_flows.errors import InventoryError, UsageError
from restore_flows.inventory import schemacheck
from restore_flows.inventory.loader import load_estate, load_inventory
from restore_flows.inventory.models import HostKind, RestoreMethod, Stage
from tests.conftest import WriteInventory

BASE = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
  - {name: brg, kind: hospital}
pools:
  - {name: imaging-arl, capacity: 4}
  - {name: imaging-brg, capacity: 2}
  - {name: backup-streams, capacity: 6}
roles:
  - name: icu-ws
    kind: workstation
    department: icu
    services: [icu]
    depends_on: ["gw-{site}"]
    pools: {reimage: ["imaging-{site}"]}
    golden_image: win11-clinical-2026.11
  - name: gw
    kind: server
    services: [icu]
    restore_method: backup
    pools: {restore: [backup-streams]}
    forensic_hold: true
"""


def test_files_are_merged_and_sections_can_live_anywhere(write_inventory: WriteInventory) -> None:
    directory = write_inventory(
        a_base=BASE,
        b_arl="""
        hosts:
          - {name: gw-arl, role: gw, site: arl}
        """,
        c_brg="""
        hosts:
          - {name: gw-brg, role: gw, site: brg}
        sites:
          - {name: cvl, kind: creche}
        """,
        d_cvl="""
        hosts:
          - {name: gw-cvl, role: gw, site: cvl, pools: {}}
        """,
    )
    estate = load_estate(directory)
    assert list(estate.hosts) == ["gw-arl", "gw-brg", "gw-cvl"]
    assert set(estate.sites) == {"arl", "brg", "cvl"}


def test_host_over_group_over_role(write_inventory: WriteInventory) -> None:
    directory = write_inventory(
        base=BASE,
        hosts="""
        hosts:
          - {name: gw-arl, role: gw, site: arl}
          - {name: gw-brg, role: gw, site: brg, forensic_hold: false}
        groups:
          - defaults: {role: icu-ws, site: arl, department: icu-arl}
            hosts:
              - name: ws-icu-arl-[001:003]
              - {name: ws-icu-brg-001, site: brg, golden_image: win11-special}
        """,
    )
    estate = load_estate(directory)
    ws = estate.hosts["ws-icu-arl-002"]
    assert ws.kind is HostKind.WORKSTATION
    assert ws.site == "arl"
    assert ws.department == "icu-arl"  # group default over role
    assert ws.depends_on == ("gw-arl",)  # '{site}' filled with the host's site
    assert ws.pools == {Stage.REIMAGE: ("imaging-arl",)}
    assert ws.golden_image == "win11-clinical-2026.11"
    special = estate.hosts["ws-icu-brg-001"]
    assert special.site == "brg"
    assert special.depends_on == ("gw-brg",)
    assert special.pools == {Stage.REIMAGE: ("imaging-brg",)}
    assert special.golden_image == "win11-special"
    assert estate.hosts["gw-arl"].forensic_hold is True
    assert estate.hosts["gw-brg"].forensic_hold is False  # explicit false beats the role
    assert estate.hosts["gw-arl"].restore_method is RestoreMethod.BACKUP
    assert str(estate.hosts["ws-icu-arl-003"].location).endswith("hosts.yaml:7")


def test_yaml_merge_keys_work_as_defaults(write_inventory: WriteInventory) -> None:
    directory = write_inventory(
        base=BASE,
        hosts="""
        x-gw: &gw {role: gw, services: [icu, monitoring]}
        hosts:
          - {<<: *gw, name: gw-arl, site: arl}
          - {<<: *gw, name: gw-brg, site: brg}
        """,
    )
    result = load_inventory(directory)
    # A top-level anchor holder is not a known section: engineers put anchors inside sections.
    assert [d.message for d in result.errors] == [
        "unknown section 'x-gw' (sections are: waves, sites, pools, roles, groups, hosts, procedures)"
    ]
    directory = write_inventory(
        base=BASE,
        hosts="""
        hosts:
          - &gw {role: gw, services: [icu, monitoring], name: gw-arl, site: arl}
          - {<<: *gw, name: gw-brg, site: brg}
        """,
    )
    estate = load_estate(directory)
    assert estate.hosts["gw-brg"].services == ("icu", "monitoring")


def test_depends_on_a_range_means_all_of_it(write_inventory: WriteInventory) -> None:
    directory = write_inventory(
        base=BASE,
        hosts="""
        hosts:
          - {name: "node-[1:3]", role: gw, site: arl}
          - {name: gw-arl, role: gw, site: arl, depends_on: ["node-[1:3]", node-2]}
        """,
    )
    assert load_estate(directory).hosts["gw-arl"].depends_on == ("node-1", "node-2", "node-3")


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_inventory(tmp_path / "nope")


def test_load_estate_raises_with_all_diagnostics(write_inventory: WriteInventory) -> None:
    directory = write_inventory(
        base=BASE,
        hosts="""
        hosts:
          - {name: a, role: gw, site: nowhere}
          - {name: b, role: nothing, site: arl}
        """,
    )
    with pytest.raises(InventoryError) as info:
        load_estate(directory)
    messages = sorted(d.message for d in info.value.diagnostics if d.severity == "error")
    assert messages == ["unknown role 'nothing'", "unknown site 'nowhere'"]


def test_each_dependency_gates_the_stage_that_needs_it(write_inventory: WriteInventory) -> None:
    estate = load_estate(
        write_inventory(
            estate="""
            waves:
              - {name: rest, services: ["*"]}
            sites:
              - {name: arl, kind: hospital}
            roles:
              - {name: infra, kind: server}
              - {name: vm, kind: server, restore_method: backup, depends_on: [esx-01, dc-01]}
              - name: ws
                kind: workstation
                depends_on: [dc-01, {host: "pxe-{site}-01", before: reimage}]
              - {name: legacy, kind: workstation, depends_on: [dc-01], dependencies_before: wipe}
            hosts:
              - {name: esx-01, role: infra, site: arl}
              - {name: dc-01, role: infra, site: arl}
              - {name: pxe-arl-01, role: infra, site: arl}
              - {name: app-01, role: vm, site: arl}
              - {name: ws-01, role: ws, site: arl}
              - {name: ws-02, role: ws, site: arl, depends_on: [{host: dc-01, before: release}, dc-01]}
              - {name: old-01, role: legacy, site: arl}
            """
        )
    )
    hosts = estate.hosts
    # Defaults: a VM needs its dependencies for the restore; a reimaged host for verification.
    assert hosts["app-01"].gates == {"esx-01": Stage.RESTORE, "dc-01": Stage.RESTORE}
    assert hosts["ws-01"].gates == {"dc-01": Stage.VERIFY, "pxe-arl-01": Stage.REIMAGE}
    # Named twice: the earlier stage wins, it is the stricter promise.
    assert hosts["ws-02"].gates == {"dc-01": Stage.VERIFY}
    assert hosts["old-01"].gates == {"dc-01": Stage.WIPE}
    assert hosts["ws-01"].depends_on == ("dc-01", "pxe-arl-01")


@pytest.mark.parametrize(
    "text",
    [
        *(f"{key}: x" for key in sorted(schemacheck.SECRET_KEYS | schemacheck._USER_KEYS)),
        "description: '-----BEGIN PGP PRIVATE KEY BLOCK-----'",
        "url: https://a:b@h/",
        "address: root:calvin@10.0.0.9",
        "command: sshpass -p x ssh h",
        "command: mysql -px",
        "command: net use \\\\fs /user:svc x",
        "command: ConvertTo-SecureString x -AsPlainText",
    ],
)
def test_the_secret_pre_check_never_says_no_wrongly(text: str) -> None:
    """A file the pre-check passes over is never walked for secrets: every rule must leave a mark."""
    assert schemacheck.may_hold_secrets(text)
    assert schemacheck.may_hold_secrets(text.upper())
