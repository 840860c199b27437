"""RedfishPower against real sushy-tools emulators on loopback (tests.peers.sushy): power really changes,
the boot override and virtual media really take, and auth and TLS fail the way an operator can act on.

sushy lands a power change 1-11 s after the reset, and only when the system is read: the driver polls
every 0.1 s for up to 15 s. The power tests share one emulator and wait for their changes together.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from restore_flows.drivers.base import BootDevice, DriverError, PowerState
from restore_flows.drivers.redfish import RedfishAccessError, RedfishPower
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Bmc
from tests.drivers.redfish.conftest import SECRET_NAME, make_host
from tests.peers.sushy import (
    LoopbackHttp,
    SushyEmulator,
    SushySystem,
    loopback_http,
    make_tls,
    sushy_emulator,
)

StartSushy = Callable[..., SushyEmulator]


def driver_for(emulator: SushyEmulator, credentials: str | None = None) -> RedfishPower:
    secret = credentials if credentials is not None else emulator.credentials
    return RedfishPower(
        FakeSecrets({SECRET_NAME: secret} if secret is not None else {}), poll_timeout=15.0, poll_interval=0.1
    )


def host_for(emulator: SushyEmulator, system: str | None, name: str = "srv-icu-01", **bmc: object) -> Host:
    fields: dict[str, object] = {
        "address": emulator.url,
        "system_id": emulator.systems[system] if system is not None else None,
        "credentials_secret": SECRET_NAME if emulator.credentials is not None else None,
        "ca_bundle": str(emulator.ca_bundle) if emulator.ca_bundle is not None else None,
    }
    fields.update(bmc)
    return make_host(Bmc.model_validate(fields), name=name)


def read_system(emulator: SushyEmulator, system: str) -> dict[str, object]:
    with emulator.client() as client:
        response = client.get(emulator.system_url(system))
        response.raise_for_status()
        body: dict[str, object] = response.json()
        return body


@dataclass
class PowerLab:
    emulator: SushyEmulator
    listener: LoopbackHttp
    """Receives the notifications of db-1 (``external_notifier``)."""
    hosts: dict[str, Host]
    before: dict[str, PowerState]
    done: dict[str, Future[None]]
    """web-1: power_off, web-2: power_on, db-1: power_cycle; all started at once."""


@pytest.fixture(scope="module")
def power_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PowerLab]:
    """One BMC with three systems, and the three power operations started together from threads (as
    Prefect runs tasks) by one driver. Each sushy change takes 1-11 s: waiting for all of them at once
    bounds the module's wait at about 22 s (a cycle is two changes) instead of 44."""
    systems = [
        SushySystem("web-1", "On"),
        SushySystem("web-2", "Off"),
        SushySystem("db-1", "On", external_notifier=True),
    ]
    with (
        loopback_http() as listener,
        sushy_emulator(
            tmp_path_factory.mktemp("power-lab"), systems, notify_url=listener.url + "/power"
        ) as emulator,
        driver_for(emulator) as driver,
        ThreadPoolExecutor(3) as pool,
    ):
        hosts = {system.name: host_for(emulator, system.name, system.name) for system in systems}
        before = {name: driver.power_state(host) for name, host in hosts.items()}
        done = {
            "web-1": pool.submit(driver.power_off, hosts["web-1"]),
            "web-2": pool.submit(driver.power_on, hosts["web-2"]),
            "db-1": pool.submit(driver.power_cycle, hosts["db-1"]),
        }
        yield PowerLab(emulator, listener, hosts, before, done)


def test_power_off_and_on_really_change_the_state(power_lab: PowerLab) -> None:
    assert power_lab.before["web-1"] is PowerState.ON
    assert power_lab.before["web-2"] is PowerState.OFF
    power_lab.done["web-1"].result()
    power_lab.done["web-2"].result()
    assert read_system(power_lab.emulator, "web-1")["PowerState"] == "Off"
    assert read_system(power_lab.emulator, "web-2")["PowerState"] == "On"


def test_power_cycle_goes_off_then_on_and_the_notification_arrives(power_lab: PowerLab) -> None:
    assert power_lab.before["db-1"] is PowerState.ON
    power_lab.done["db-1"].result()

    def landed(requests: list[httpx.Request]) -> list[object]:
        changes = [json.loads(r.content) for r in requests if r.method == "PUT" and r.url.path == "/power"]
        return [change["power_state"] for change in changes if not change.get("pending_power")]

    # sushy PUTs the system's JSON for every change, pending ones too; the landed ones show the cycle.
    power_lab.listener.wait_for(lambda requests: landed(requests) == ["Off", "On"], timeout=5)
    notification = json.loads(power_lab.listener.requests[-1].content)
    assert notification["name"] == "db-1"
    assert notification["uuid"] == power_lab.emulator.systems["db-1"]
    assert read_system(power_lab.emulator, "db-1")["PowerState"] == "On"


@pytest.mark.parametrize("by", ["name", "uuid"])
def test_boot_once_really_sets_the_override(start_sushy: StartSushy, by: str) -> None:
    emulator = start_sushy([SushySystem("pacs-1"), SushySystem("pacs-2")])
    # A system id that is a name gets a 307 to the UUID URL, which the driver follows.
    host = host_for(emulator, None, system_id="pacs-2" if by == "name" else emulator.systems["pacs-2"])
    with driver_for(emulator) as driver:
        for device, target in [(BootDevice.PXE, "Pxe"), (BootDevice.CD, "Cd"), (BootDevice.DISK, "Hdd")]:
            driver.boot_once(host, device)
            boot = read_system(emulator, "pacs-2")["Boot"]
            assert isinstance(boot, dict)
            assert boot["BootSourceOverrideTarget"] == target
            assert boot["BootSourceOverrideEnabled"] == "Continuous"  # sushy's quirk: Once is not kept
    untouched = read_system(emulator, "pacs-1")["Boot"]
    assert isinstance(untouched, dict)
    assert untouched["BootSourceOverrideTarget"] == "Hdd"


def test_several_systems_and_no_system_id_is_a_clear_error(start_sushy: StartSushy) -> None:
    emulator = start_sushy([SushySystem("a"), SushySystem("b")])
    with driver_for(emulator) as driver, pytest.raises(DriverError, match="manages 2 systems") as caught:
        driver.power_state(host_for(emulator, None))
    assert not caught.value.retryable
    for uuid in emulator.systems.values():
        assert uuid in caught.value.detail


def test_virtual_media_is_really_inserted_and_ejected(start_sushy: StartSushy) -> None:
    iso = b"\x00" * 2048 + b"CD001"

    def images(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/images/winpe.iso":
            return httpx.Response(200, content=iso, headers={"Content-Type": "application/octet-stream"})
        return httpx.Response(404)

    with loopback_http(images) as server:
        emulator = start_sushy([SushySystem("ws-1")])
        host = host_for(emulator, "ws-1")
        url = server.url + "/images/winpe.iso"
        cd_url = emulator.system_url("ws-1") + "/VirtualMedia/Cd"
        with driver_for(emulator) as driver, emulator.client() as client:
            driver.insert_media(host, url)
            assert [r.url.path for r in server.requests] == ["/images/winpe.iso"]  # sushy really fetched it
            cd = client.get(cd_url).json()
            assert (cd["Inserted"], cd["Image"], cd["ImageName"]) == (True, url, "winpe.iso")
            driver.eject_media(host)
            cd = client.get(cd_url).json()
            assert (cd["Inserted"], cd["Image"]) == (False, "")


def test_wrong_credentials_are_a_clear_non_retryable_error_and_no_secret_leaks(
    start_sushy: StartSushy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    right, wrong = "Corr3ct-Horse:Battery", "Wr0ng-Staple-99"
    emulator = start_sushy([SushySystem("lab-1", "On")], auth=("admin", right), tls=True)
    host = host_for(emulator, "lab-1")
    with driver_for(emulator) as driver:
        assert driver.power_state(host) is PowerState.ON
    with driver_for(emulator, f"admin:{wrong}") as driver, pytest.raises(RedfishAccessError) as caught:
        driver.power_state(host)
    error = caught.value
    assert not error.retryable
    assert error.status == 401
    assert error.detail == (
        f"BMC at {emulator.url}: GET /redfish/v1/Systems: HTTP 401 Unauthorized: Incorrect username or "
        f"password (credentials from secret {SECRET_NAME!r})"
    )
    seen = f"{error}\n{error!r}\n{error.messages}\n{caplog.text}\n{emulator.log()}"
    for password in (right, wrong):
        assert password not in seen
        assert base64.b64encode(f"admin:{password}".encode()).decode() not in seen


def test_tls_is_verified_against_the_inventorys_ca_bundle(start_sushy: StartSushy, tmp_path: Path) -> None:
    emulator = start_sushy([SushySystem("lab-1", "On")], auth=("admin", "pw"), tls=True)
    assert emulator.url.startswith("https://")
    with driver_for(emulator) as driver:
        assert driver.power_state(host_for(emulator, "lab-1")) is PowerState.ON
        # Checks off only because the inventory says so.
        unchecked = host_for(emulator, "lab-1", name="unchecked", ca_bundle=None, verify_tls=False)
        assert driver.power_state(unchecked) is PowerState.ON


@pytest.mark.parametrize("trusted", ["system store", "another CA"])
def test_an_untrusted_bmc_certificate_is_a_clear_non_retryable_error(
    start_sushy: StartSushy, tmp_path: Path, trusted: str
) -> None:
    emulator = start_sushy([SushySystem("lab-1", "On")], auth=("admin", "pw"), tls=True)
    ca_bundle = None if trusted == "system store" else str(make_tls(tmp_path / "other-ca").ca_bundle)
    host = host_for(emulator, "lab-1", ca_bundle=ca_bundle)
    with driver_for(emulator) as driver, pytest.raises(DriverError) as caught:
        driver.power_state(host)
    error = caught.value
    assert not error.retryable
    given = "no bmc.ca_bundle given" if ca_bundle is None else f"bmc.ca_bundle is {ca_bundle!r}"
    assert error.detail == (
        f"BMC at {emulator.url}: GET /redfish/v1/: TLS certificate not trusted (unable to get local issuer "
        f"certificate; {given}): give the CA that signed the BMC's certificate as bmc.ca_bundle"
    )
    assert isinstance(error.__cause__, httpx.ConnectError)
