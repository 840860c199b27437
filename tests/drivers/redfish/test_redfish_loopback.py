"""RedfishPower over real sockets on loopback, with its default client: the scripted BMC served by a
small HTTP server (a BMC that never changes power, one that only answers 500, one that says nothing)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from restore_flows.drivers.base import DriverError, DriverTimeout
from restore_flows.drivers.redfish import RedfishPower, RedfishServerError
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Bmc
from tests.drivers.redfish.conftest import SECRET_NAME, make_host
from tests.drivers.redfish.scripted_bmc import SESSIONS, ScriptedBmc, error
from tests.peers.sushy import LoopbackHttp, loopback_http


@pytest.fixture
def served(scripted: ScriptedBmc) -> Iterator[LoopbackHttp]:
    with loopback_http(scripted.handle) as server:
        yield server


def driver_for(
    scripted: ScriptedBmc, *, poll_timeout: float = 5.0, poll_interval: float = 0.05
) -> RedfishPower:
    secrets = FakeSecrets({SECRET_NAME: f"{scripted.user}:{scripted.password}"})
    return RedfishPower(secrets, poll_timeout=poll_timeout, poll_interval=poll_interval)


def host_at(address: str) -> Host:
    return make_host(Bmc(address=address, credentials_secret=SECRET_NAME))


def test_a_bmc_that_accepts_resets_but_never_changes_power_times_out(
    scripted: ScriptedBmc, served: LoopbackHttp
) -> None:
    scripted.changes_power = False
    started = time.monotonic()
    with (
        driver_for(scripted, poll_timeout=0.5, poll_interval=0.05) as driver,
        pytest.raises(DriverTimeout) as caught,
    ):
        driver.power_cycle(host_at(served.url))
    assert caught.value.detail == f"BMC at {served.url} did not report power Off within 0.5 s (last: On)"
    assert caught.value.retryable
    assert time.monotonic() - started < 10
    assert scripted.resets == ["ForceOff"]


def test_a_bmc_answering_500_is_a_retryable_server_error() -> None:
    with (
        loopback_http(lambda request: error(500, "error_500_internal")) as broken,
        RedfishPower(FakeSecrets({SECRET_NAME: "admin:pw"})) as driver,
        pytest.raises(RedfishServerError) as caught,
    ):
        driver.power_state(host_at(broken.url))
    assert caught.value.retryable
    assert caught.value.status == 500
    assert caught.value.detail == (
        f"BMC at {broken.url}: GET /redfish/v1/: HTTP 500 Internal Server Error: The request failed due to an"
        " internal service error.  The service is still operational. (Base.1.16.InternalError)"
    )


def test_sessions_over_http_log_in_once_and_out_at_close(scripted: ScriptedBmc, served: LoopbackHttp) -> None:
    host = host_at(served.url)
    with driver_for(scripted, poll_interval=0.01) as driver:
        driver.power_off(host)
        driver.power_on(host)
    assert scripted.resets == ["GracefulShutdown", "On"]
    methods = [(r.method, r.url.path) for r in served.requests]
    assert methods.count(("POST", SESSIONS)) == 1
    assert methods[-1] == ("DELETE", f"{SESSIONS}/1")
    after_login = served.requests[methods.index(("POST", SESSIONS)) + 1 :]
    assert all(r.headers.get("X-Auth-Token") == "token-1" for r in after_login)
    assert not any("Authorization" in r.headers for r in served.requests)


def test_an_unreachable_bmc_is_retryable() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = placeholder.getsockname()[1]
        with (
            RedfishPower(FakeSecrets({})) as driver,
            pytest.raises(DriverError, match="cannot reach the BMC") as caught,
        ):
            driver.power_state(make_host(Bmc(address=f"http://127.0.0.1:{port}")))
    assert type(caught.value) is DriverError
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_https_to_a_bmc_that_speaks_plain_http_is_a_tls_error(served: LoopbackHttp) -> None:
    address = served.url.replace("http://", "https://")
    with (
        RedfishPower(FakeSecrets({})) as driver,
        pytest.raises(DriverError, match="TLS handshake failed") as caught,
    ):
        driver.power_state(make_host(Bmc(address=address)))
    assert not caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_a_bmc_that_never_answers_is_a_driver_timeout() -> None:
    release = threading.Event()

    def silent(request: httpx.Request) -> httpx.Response:
        release.wait(10)
        return httpx.Response(503)

    with loopback_http(silent) as mute:
        try:
            factory = lambda bmc: httpx.Client(timeout=0.3)  # noqa: E731
            with (
                RedfishPower(FakeSecrets({}), client_factory=factory) as driver,
                pytest.raises(
                    DriverTimeout, match=r"GET /redfish/v1/: no answer in time \(ReadTimeout\)"
                ) as caught,
            ):
                driver.power_state(make_host(Bmc(address=mute.url)))
        finally:
            release.set()
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
