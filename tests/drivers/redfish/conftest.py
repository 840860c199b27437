"""Fixtures for the Redfish driver tests: hosts with a BMC, a fake clock, drivers wired to a scripted BMC."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from restore_flows.drivers.redfish import RedfishPower
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Bmc, HostKind, RestoreMethod
from restore_flows.inventory.yamlsource import Location
from tests.drivers.redfish.scripted_bmc import ScriptedBmc
from tests.peers.sushy import start_sushy  # noqa: F401 (a fixture, used by name)

SECRET_NAME = "bmc/ward-7"


def make_host(bmc: Bmc | None, name: str = "srv-icu-01") -> Host:
    return Host(
        name=name,
        kind=HostKind.SERVER,
        site="arlon",
        role="app",
        department="icu",
        services=("pacs",),
        depends_on=(),
        pools={},
        restore_method=RestoreMethod.REIMAGE,
        forensic_hold=False,
        location=Location("inventory/servers.yaml", 1),
        bmc=bmc,
    )


@dataclass
class FakeClock:
    """Time that passes only when the driver sleeps: polling with a deadline runs instantly."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def scripted() -> ScriptedBmc:
    return ScriptedBmc()


MakeDriver = Callable[..., RedfishPower]


@pytest.fixture
def make_driver(scripted: ScriptedBmc, clock: FakeClock) -> Iterator[MakeDriver]:
    """Drivers that reach ``scripted`` through httpx.MockTransport, with the fake clock; closed at the end."""
    drivers: list[RedfishPower] = []

    def make(secret: str | None = None, **options: Any) -> RedfishPower:
        credentials = secret if secret is not None else f"{scripted.user}:{scripted.password}"
        settings: dict[str, Any] = {
            "client_factory": lambda bmc: httpx.Client(transport=httpx.MockTransport(scripted.handle)),
            "clock": clock,
            "sleep": clock.sleep,
            "poll_timeout": 15.0,
            "poll_interval": 1.0,
            "grace_timeout": 60.0,
            "conflict_delay": 2.0,
        }
        settings.update(options)
        driver = RedfishPower(FakeSecrets({SECRET_NAME: credentials}), **settings)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()


@pytest.fixture
def host() -> Host:
    return make_host(Bmc(address="bmc-icu-01.hospital.test", credentials_secret=SECRET_NAME))
