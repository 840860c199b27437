"""The live fleet's composition of drivers, with the fakes that stand in for each capability."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import httpx
import pytest

from restore_flows.drivers.base import BootDevice, CommandResult, DriverError, Verification
from restore_flows.drivers.commands import Dialect, quote
from restore_flows.drivers.fake import FakeDeployment, FakePower, FakeShell
from restore_flows.drivers.live import LiveFleet, LiveSettings
from restore_flows.inventory.estate import Host
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.states import HostState
from tests.conftest import WriteInventory
from tests.execution.conftest import run_threads
from tests.peers.sushy import loopback_http

ESTATE = """
waves:
  - {name: icu, services: [icu]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
roles:
  - name: gw
    kind: server
    services: [icu]
    golden_image: win2022-gold-7
    ssh: {user: restore, host_key: "ssh-ed25519 AAAAold", key_secret: ssh-key, shell: posix}
  - {name: mgmt, kind: server, services: [mgmt], ssh: {user: ops, key_secret: ssh-key, shell: posix}}
  - {name: vm, kind: server, services: [emr], restore_method: backup, checks: [{type: tcp_port, port: 443}]}
hosts:
  - {name: mgmt-01, role: mgmt, site: arl, address: 127.0.0.1}
  - {name: emr-db-01, role: vm, site: arl}
  - {name: lis-db-01, role: vm, site: arl, address: 10.20.0.7, drivers: {backup: http, network: http}}
groups:
  - defaults: {role: gw, site: arl}
    hosts:
      - {name: gw-01, bmc: {address: "https://127.0.0.1:8443", system_id: gw-01, credentials_secret: bmc-arl}}
      - {name: gw-02, bmc: {address: "https://127.0.0.1:8443", system_id: gw-02, credentials_secret: bmc-arl}}
      - {name: gw-03, bmc: {address: "https://127.0.0.1:8443", system_id: gw-03, credentials_secret: bmc-arl}}
      - {name: gw-04, bmc: {address: "https://127.0.0.1:8443", system_id: gw-04, credentials_secret: bmc-arl}}
      - {name: gw-05}
      - {name: gw-06, forensic_hold: true, bmc: {address: "https://127.0.0.1:8443", system_id: gw-06}}
"""
RELEASE = "move-to-production --host {host}"
BACKUP = "restore-vm --name {host}"


class Checks:
    def __init__(self) -> None:
        self.findings: dict[str, tuple[str, ...]] = {}

    def verify(self, host: Host) -> Verification:
        return Verification(ioc_findings=self.findings.get(host.name, ()))


@pytest.fixture
def the_plan(write_inventory: WriteInventory) -> Plan:
    return plan(load_estate(write_inventory(estate=ESTATE)))


@pytest.fixture
def ledger(tmp_path: Path, the_plan: Plan) -> Ledger:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    return ledger


def _fleet(the_plan: Plan, deployment: FakeDeployment, shell: FakeShell) -> tuple[LiveFleet, FakePower]:
    def booted(host: Host, device: BootDevice | None) -> None:
        if device is BootDevice.PXE:
            deployment.network_boot(host.name)

    power = FakePower(on_power_cycle=booted)
    fleet = LiveFleet(
        power={"redfish": power},
        shell=shell,
        deployment=deployment,
        checks=Checks(),
        hosts=the_plan.estate.hosts,
        settings=LiveSettings(
            poll_seconds=0, management_host="mgmt-01", release_command=RELEASE, backup_command=BACKUP
        ),
        sleep=lambda seconds: None,
    )
    return fleet, power


def _released(host: Host, command: str) -> CommandResult | None:
    done = command.startswith(("move-to-production", "restore-vm"))
    return CommandResult(0, "done\n", "") if done else None


def test_a_live_wave_wipes_by_network_boot_pins_the_reported_key_and_releases(
    ledger: Ledger, the_plan: Plan
) -> None:
    deployment = FakeDeployment(new_host_key=lambda host: f"ssh-ed25519 NEW-{host}")
    shell = FakeShell(responders=[_released])
    fleet, power = _fleet(the_plan, deployment, shell)
    _, summary = run_threads(
        ledger,
        the_plan,
        fleet,
        "icu",
        mode="live",
        approver="Dr. Osei",
    )
    states = ledger.states()
    assert [states[f"gw-0{n}"] for n in range(1, 5)] == [HostState.ONLINE] * 4
    for n in range(1, 5):
        name = f"gw-0{n}"
        assert [call for host, call in power.calls if host == name] == ["boot_once pxe", "power_cycle"]
        assert shell.host_keys[name] == f"ssh-ed25519 NEW-{name}"
        assert ("mgmt-01", f"move-to-production --host {quote(name, Dialect.POSIX)}") in shell.commands
        # What each stage did is in the ledger's log.
        details = {t.event: t.detail for t in ledger.history(name).transitions}
        assert details["wipe_done"] is not None
        assert details["wipe_done"].startswith("deployment job job-")
        assert details["wipe_done"].endswith("for win2022-gold-7; network boot and power cycle by the BMC")
        assert details["reimage_done"] is not None
        assert "installed win2022-gold-7; new host key" in details["reimage_done"]
        assert details["release_done"] == "release_command ran on mgmt-01"
    # No BMC: nothing to boot it from the network with; forensic hold: the forensic team registers first.
    assert states["gw-05"] is HostState.WIPE_FAILED
    assert "no power driver 'none'" in (ledger.history("gw-05").attempts[-1].error or "")
    assert states["gw-06"] is HostState.EVIDENCE_FAILED
    assert "restore evidence add gw-06" in (ledger.history("gw-06").attempts[-1].error or "")
    assert not summary.ok


def test_an_install_of_the_wrong_image_is_refused_and_its_key_never_pinned(
    ledger: Ledger, the_plan: Plan
) -> None:
    deployment = FakeDeployment(
        installed_image=lambda host, image: "win2019-old" if host == "gw-02" else image
    )
    shell = FakeShell(responders=[_released])
    fleet, _ = _fleet(the_plan, deployment, shell)
    run_threads(
        ledger,
        the_plan,
        fleet,
        "icu",
        hosts=("gw-01", "gw-02"),
        mode="live",
        approver="Dr. Osei",
    )
    assert ledger.host("gw-01").state is HostState.ONLINE
    assert ledger.host("gw-02").state is HostState.REIMAGE_FAILED
    error = ledger.history("gw-02").attempts[-1].error or ""
    assert "installed image 'win2019-old', the inventory expects 'win2022-gold-7'" in error
    assert "gw-02" not in shell.host_keys


def test_a_failed_deployment_job_fails_the_wipe(ledger: Ledger, the_plan: Plan) -> None:
    deployment = FakeDeployment(fail={"gw-03"})
    fleet, _ = _fleet(the_plan, deployment, FakeShell(responders=[_released]))
    run_threads(
        ledger,
        the_plan,
        fleet,
        "icu",
        hosts=("gw-03",),
        mode="live",
        approver="Dr. Osei",
    )
    assert ledger.host("gw-03").state is HostState.WIPE_FAILED
    attempts = ledger.history("gw-03").attempts
    assert len(attempts) == 3  # retried, since a deployment failure may be transient
    assert "simulated install failure" in (attempts[-1].error or "")


def test_resume_trusts_the_deployment_servers_facts_not_the_clock(the_plan: Plan) -> None:
    deployment = FakeDeployment()
    shell = FakeShell()
    fleet, _ = _fleet(the_plan, deployment, shell)
    host = the_plan.estate.hosts["gw-04"]
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    assert not fleet.stage_finished(host, Stage.WIPE, before)  # no job at all
    deployment.assign("gw-04", "win2022-gold-7", None)
    assert not fleet.stage_finished(host, Stage.WIPE, before)  # assigned, never booted
    deployment.network_boot("gw-04")
    assert fleet.stage_finished(host, Stage.WIPE, before)
    assert fleet.stage_finished(host, Stage.REIMAGE, before)
    assert shell.host_keys["gw-04"] == "ssh-ed25519 FAKE-gw-04"
    # An install that ended before the interrupted stage started says nothing about that stage.
    assert not fleet.stage_finished(host, Stage.REIMAGE, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))
    assert not fleet.stage_finished(host, Stage.RELEASE, before)


def test_a_vm_server_is_rebuilt_from_backup_by_the_management_host(ledger: Ledger, the_plan: Plan) -> None:
    deployment = FakeDeployment()
    shell = FakeShell(responders=[_released])
    fleet, power = _fleet(the_plan, deployment, shell)
    name = "emr-db-01"
    run_threads(
        ledger,
        the_plan,
        fleet,
        "rest",
        hosts=(name,),
        mode="live",
        approver="Dr. O",
    )
    assert ledger.host(name).state is HostState.ONLINE
    assert ("mgmt-01", f"restore-vm --name {quote(name, Dialect.POSIX)}") in shell.commands
    assert deployment.status(name) is None  # no network boot for a VM
    assert not [call for host, call in power.calls if host == name]
    details = {t.event: t.detail for t in ledger.history(name).transitions}
    assert details["wipe_done"] == "VM server: its disks are replaced by the backup restore that follows"
    assert details["restore_done"] == "backup_command ran on mgmt-01"


def test_backup_restore_and_release_by_http_calls(ledger: Ledger, the_plan: Plan) -> None:
    def api(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/fail"):
            return httpx.Response(409, text="VM is locked by a snapshot job")
        return httpx.Response(202, json={"accepted": True})

    with loopback_http(api) as service, httpx.Client(headers={"Authorization": "Bearer t"}) as http:
        fleet, _ = _fleet(the_plan, FakeDeployment(), FakeShell())
        fleet.http = http
        fleet.settings = LiveSettings(
            poll_seconds=0,
            backup_url=service.url + "/vms/{host}/restore?ip={address}",
            release_url=service.url + "/ports/{host}/production",
        )
        run_threads(
            ledger,
            the_plan,
            fleet,
            "rest",
            hosts=("lis-db-01",),
            mode="live",
            approver="Dr. O",
        )
        assert ledger.host("lis-db-01").state is HostState.ONLINE
        posted = [
            (r.method, r.url.path, r.url.query.decode(), json.loads(r.content)) for r in service.requests
        ]
        body = {"host": "lis-db-01", "address": "10.20.0.7", "mac": ""}
        assert posted == [
            ("POST", "/vms/lis-db-01/restore", "ip=10.20.0.7", body),
            ("POST", "/ports/lis-db-01/production", "", body),
        ]
        assert all(r.headers["Authorization"] == "Bearer t" for r in service.requests)
        details = {t.event: t.detail for t in ledger.history("lis-db-01").transitions}
        assert (
            details["restore_done"]
            == f"backup_url: POST {service.url}/vms/lis-db-01/restore?ip=10.20.0.7 answered 202"
        )

        # A refusal is an error that names the call and what the service said; a 4xx is not retried.
        fleet.settings = LiveSettings(backup_url=service.url + "/vms/{host}/fail")
        with pytest.raises(DriverError, match="answered 409: VM is locked by a snapshot job") as refused:
            fleet.restore_backup(the_plan.estate.hosts["lis-db-01"])
        assert not refused.value.retryable
