"""RedfishPower against a scripted DMTF-style BMC through httpx.MockTransport: no network, fake clock."""

from __future__ import annotations

import base64
import json
import logging
import threading

import httpx
import pytest

from restore_flows.drivers.base import BootDevice, DriverError, DriverTimeout, PowerDriver, PowerState
from restore_flows.drivers.redfish import (
    RedfishAccessError,
    RedfishConflict,
    RedfishNotFound,
    RedfishPower,
    RedfishServerError,
)
from restore_flows.drivers.secrets import FakeSecrets
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Bmc, Stage
from tests.drivers.redfish.conftest import SECRET_NAME, FakeClock, MakeDriver, make_host
from tests.drivers.redfish.scripted_bmc import (
    CD,
    RESET,
    SESSIONS,
    SYSTEM,
    ScriptedBmc,
    error,
    json_response,
    payload,
)


def test_redfish_power_is_a_power_driver(make_driver: MakeDriver) -> None:
    driver: PowerDriver = make_driver()
    assert isinstance(driver, RedfishPower)


# --- Reading the power state ---


@pytest.mark.parametrize(
    ("redfish", "state"),
    [
        ("On", PowerState.ON),
        ("Off", PowerState.OFF),
        ("PoweringOn", PowerState.POWERING_ON),
        ("PoweringOff", PowerState.POWERING_OFF),
    ],
)
def test_power_state_maps_redfish_values(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host, redfish: str, state: PowerState
) -> None:
    scripted.power = redfish
    assert make_driver().power_state(host) is state


def test_an_unknown_power_state_is_an_error_not_a_guess(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.power = "Paused"
    with pytest.raises(DriverError, match="unknown power state 'Paused'") as caught:
        make_driver().power_state(host)
    assert not caught.value.retryable


# --- Discovery ---


def test_the_only_system_is_discovered_once_per_bmc(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)
    driver.power_state(host)
    driver.power_state(make_host(host.bmc, name="same-bmc-other-host"))
    assert len(scripted.sent("GET", "/redfish/v1/Systems")) == 1
    assert len(scripted.sent("POST", SESSIONS)) == 1
    assert len(scripted.sent("GET", SYSTEM)) == 3


def test_several_systems_need_a_system_id(make_driver: MakeDriver, scripted: ScriptedBmc, host: Host) -> None:
    scripted.collection = payload("system_collection_blades")
    with pytest.raises(DriverError, match=r"manages 2 systems .*Blade1.*Blade2.*set bmc.system_id") as caught:
        make_driver().power_state(host)
    assert not caught.value.retryable


def test_system_id_picks_the_member(make_driver: MakeDriver, scripted: ScriptedBmc) -> None:
    scripted.collection = payload("system_collection_blades")
    scripted.queue(
        "GET", "/redfish/v1/Systems/Blade2", json_response(200, {**scripted.system, "PowerState": "Off"})
    )
    blade = make_host(Bmc(address="chassis-1", system_id="Blade2", credentials_secret=SECRET_NAME))
    assert make_driver().power_state(blade) is PowerState.OFF


def test_an_aliased_system_id_follows_the_redirect(make_driver: MakeDriver, scripted: ScriptedBmc) -> None:
    # As sushy-tools does for a system asked for by name.
    scripted.queue(
        "GET", "/redfish/v1/Systems/WebFrontEnd483", httpx.Response(307, headers={"Location": SYSTEM})
    )
    named = make_host(Bmc(address="bmc", system_id="WebFrontEnd483", credentials_secret=SECRET_NAME))
    driver = make_driver()
    assert driver.power_state(named) is PowerState.ON
    driver.power_state(named)
    assert len(scripted.sent("GET", "/redfish/v1/Systems/WebFrontEnd483")) == 1  # the canonical path is kept


def test_an_unknown_system_id_names_what_the_bmc_has(make_driver: MakeDriver) -> None:
    missing = make_host(Bmc(address="bmc", system_id="nope", credentials_secret=SECRET_NAME))
    with pytest.raises(DriverError, match=r"has no system 'nope' \(it has /redfish/v1/Systems/437XR1138R2\)"):
        make_driver().power_state(missing)


# --- Authentication ---


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_session_is_used_when_offered_and_closed_at_the_end(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)
    (login,) = scripted.sent("POST", SESSIONS)
    assert json.loads(login.content) == {"UserName": scripted.user, "Password": scripted.password}
    assert login.headers["Content-Type"] == "application/json"
    for request in scripted.requests[1:]:
        if request is not login:
            assert request.headers.get("X-Auth-Token") == "token-1"
            assert "Authorization" not in request.headers
    driver.close()
    assert [r.url.path for r in scripted.sent("DELETE")] == [f"{SESSIONS}/1"]
    assert scripted.tokens == set()


def test_basic_auth_when_the_service_offers_no_sessions(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.sessions = False  # the service root has no SessionService, as sushy-tools'
    make_driver().power_state(host)
    assert scripted.sent("POST", SESSIONS) == []
    assert scripted.sent("GET", SYSTEM)[0].headers["Authorization"] == _basic(
        scripted.user, scripted.password
    )


def test_basic_auth_when_the_advertised_session_service_answers_404(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.queue("POST", SESSIONS, json_response(404, {"error": {"message": "Not Found"}}))
    make_driver().power_state(host)
    assert len(scripted.sent("POST", SESSIONS)) == 1
    assert scripted.sent("GET", SYSTEM)[0].headers["Authorization"] == _basic(
        scripted.user, scripted.password
    )


def test_an_expired_session_is_renewed_once(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)
    scripted.tokens.clear()  # the BMC forgot the session (idle timeout, BMC reboot)
    assert driver.power_state(host) is PowerState.ON
    assert len(scripted.sent("POST", SESSIONS)) == 2
    assert scripted.sent("GET", SYSTEM)[-1].headers["X-Auth-Token"] == "token-2"


def test_wrong_credentials_are_a_clear_non_retryable_error_without_the_password(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    wrong = "admin:Wr0ng-but-secret"
    with pytest.raises(RedfishAccessError) as caught:
        make_driver(secret=wrong).power_state(host)
    error = caught.value
    assert not error.retryable
    assert error.status == 401
    assert error.stage is Stage.REIMAGE
    assert f"credentials from secret {SECRET_NAME!r}" in str(error)
    assert "There is no valid session established with the implementation." in str(error)
    assert "Wr0ng-but-secret" not in f"{error} {error!r} {error.detail} {error.messages}"


def test_refused_credentials_are_read_again_on_the_next_call(
    scripted: ScriptedBmc, clock: FakeClock, host: Host
) -> None:
    values = {SECRET_NAME: "admin:old-password"}
    transport = httpx.MockTransport(scripted.handle)
    with RedfishPower(
        FakeSecrets(values), client_factory=lambda bmc: httpx.Client(transport=transport)
    ) as driver:
        with pytest.raises(RedfishAccessError):
            driver.power_state(host)
        values[SECRET_NAME] = f"{scripted.user}:{scripted.password}"  # an operator fixed the secret
        assert driver.power_state(host) is PowerState.ON


def test_insufficient_privilege_is_an_access_error(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)
    scripted.queue("POST", RESET, error(403, "error_403_insufficient_privilege"))
    with pytest.raises(RedfishAccessError, match="insufficient privileges") as caught:
        driver.power_cycle(host)
    assert not caught.value.retryable


def test_a_missing_secret_is_named(make_driver: MakeDriver) -> None:
    unknown = make_host(Bmc(address="bmc", credentials_secret="bmc/unknown"))
    with pytest.raises(DriverError, match="secret 'bmc/unknown' is not set") as caught:
        make_driver().power_state(unknown)
    assert not caught.value.retryable


def test_a_host_without_bmc_is_an_error(make_driver: MakeDriver, host: Host) -> None:
    no_bmc = make_host(None)
    with pytest.raises(DriverError, match="no BMC"):
        make_driver().power_on(no_bmc)


def test_logins_happen_once_when_threads_start_together(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    results: list[PowerState] = []
    threads = [threading.Thread(target=lambda: results.append(driver.power_state(host))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [PowerState.ON] * 8
    assert len(scripted.sent("POST", SESSIONS)) == 1


# --- Power ---


def test_power_off_is_graceful_when_the_os_complies(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    make_driver().power_off(host)
    assert scripted.resets == ["GracefulShutdown"]
    assert scripted.power == "Off"
    request = scripted.sent("POST", RESET)[0]
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"ResetType": "GracefulShutdown"}


def test_power_off_forces_the_power_off_after_the_grace_time(
    make_driver: MakeDriver,
    scripted: ScriptedBmc,
    clock: FakeClock,
    host: Host,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scripted.ignores_graceful = True
    start = clock.now
    make_driver(grace_timeout=60.0).power_off(host)
    assert scripted.resets == ["GracefulShutdown", "ForceOff"]
    assert scripted.power == "Off"
    assert clock.now - start >= 60.0
    assert "forcing the power off" in caplog.text


def test_power_off_forces_when_the_bmc_refuses_a_graceful_shutdown(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.queue("POST", RESET, error(400, "error_400_value_not_in_list"))
    make_driver().power_off(host)
    assert scripted.resets == ["ForceOff"]  # the refused request never reached the reset logic
    assert len(scripted.sent("POST", RESET)) == 2


def test_power_off_forces_when_graceful_is_not_offered(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.system["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"] = [
        "On",
        "ForceOff",
    ]
    make_driver().power_off(host)
    assert scripted.resets == ["ForceOff"]


def test_power_on_and_off_do_nothing_when_already_there(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_on(host)
    scripted.power = "Off"
    driver.power_off(host)
    assert scripted.resets == []


def test_power_on_waits_through_powering_on(
    make_driver: MakeDriver, scripted: ScriptedBmc, clock: FakeClock, host: Host
) -> None:
    scripted.power = "Off"
    scripted.transition_reads = 3
    make_driver(poll_interval=0.5).power_on(host)
    assert scripted.resets == ["On"]
    assert scripted.power == "On"
    assert clock.sleeps == [0.5, 0.5, 0.5]


def test_power_cycle_forces_off_then_on(make_driver: MakeDriver, scripted: ScriptedBmc, host: Host) -> None:
    make_driver().power_cycle(host)
    assert scripted.resets == ["ForceOff", "On"]
    assert scripted.power == "On"


def test_power_cycle_restarts_when_the_bmc_offers_no_force_off(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.system["Actions"]["#ComputerSystem.Reset"]["ResetType@Redfish.AllowableValues"] = [
        "On",
        "ForceRestart",
    ]
    make_driver().power_cycle(host)
    assert scripted.resets == ["ForceRestart"]


def test_power_cycle_from_off_only_powers_on(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.power = "Off"
    make_driver().power_cycle(host)
    assert scripted.resets == ["On"]


def test_power_on_retries_a_transient_409(
    make_driver: MakeDriver, scripted: ScriptedBmc, clock: FakeClock, host: Host
) -> None:
    scripted.power = "Off"
    conflict = error(409, "error_409_resource_in_use")
    scripted.queue("POST", RESET, conflict, error(409, "error_409_resource_in_use"))
    make_driver(conflict_delay=2.0).power_on(host)
    assert len(scripted.sent("POST", RESET)) == 3
    assert scripted.resets == ["On"]
    assert scripted.power == "On"
    assert clock.sleeps[:2] == [2.0, 2.0]


def test_a_lasting_409_is_a_retryable_conflict_with_the_bmc_message(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.power = "Off"
    scripted.queue("POST", RESET, *(error(409, "error_409_resource_in_use") for _ in range(3)))
    with pytest.raises(RedfishConflict) as caught:
        make_driver(conflict_retries=3).power_on(host)
    assert caught.value.retryable
    assert (
        "HTTP 409 Conflict: The change to the requested resource failed because the resource is in use"
        in str(caught.value)
    )
    assert len(scripted.sent("POST", RESET)) == 3


def test_a_server_error_is_retryable_and_readable(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)
    scripted.queue("GET", SYSTEM, error(500, "error_500_internal"))
    with pytest.raises(RedfishServerError) as caught:
        driver.power_state(host)
    assert caught.value.retryable
    assert caught.value.status == 500
    assert "internal service error" in caught.value.detail
    assert f"GET {SYSTEM}" in caught.value.detail


def test_a_bmc_that_never_changes_times_out_clearly(
    make_driver: MakeDriver, scripted: ScriptedBmc, clock: FakeClock, host: Host
) -> None:
    scripted.changes_power = False
    start = clock.now
    with pytest.raises(DriverTimeout) as caught:
        make_driver(poll_timeout=15.0).power_cycle(host)
    assert caught.value.retryable
    assert caught.value.detail == (
        "BMC at https://bmc-icu-01.hospital.test did not report power Off within 15 s (last: On)"
    )
    assert 15.0 <= clock.now - start <= 16.0
    assert scripted.resets == ["ForceOff"]


def test_polling_rides_out_a_busy_bmc(make_driver: MakeDriver, scripted: ScriptedBmc, host: Host) -> None:
    # While the host powers on, the BMC answers 503 twice: not yet a failure.
    scripted.power = "Off"
    scripted.busy_after_reset = 2
    make_driver().power_on(host)
    assert scripted.power == "On"
    assert len(scripted.sent("GET", SYSTEM)) == 5  # reset types, state, 503, 503, On


def test_the_last_polling_error_is_in_the_timeout(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.power = "Off"
    scripted.changes_power = False
    scripted.busy_after_reset = 1000
    with pytest.raises(DriverTimeout, match=r"within 3 s \(last: error: .*HTTP 503 Service Unavailable\)"):
        make_driver(poll_timeout=3.0).power_on(host)


def test_the_stage_in_errors_is_the_drivers(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.changes_power = False
    with pytest.raises(DriverTimeout) as caught:
        make_driver(stage=Stage.WIPE).power_off(host)
    assert caught.value.stage is Stage.WIPE
    assert str(caught.value).startswith("srv-icu-01: wipe: BMC at https://bmc-icu-01.hospital.test")


# --- Transport failures ---


def _failing(exc: Exception) -> MakeDriver:
    def factory(bmc: Bmc) -> httpx.Client:
        def fail(request: httpx.Request) -> httpx.Response:
            raise exc

        return httpx.Client(transport=httpx.MockTransport(fail))

    return lambda **options: RedfishPower(FakeSecrets({}), client_factory=factory, **options)


def test_an_unreachable_bmc_is_a_retryable_error_chained_from_httpx() -> None:
    host = make_host(Bmc(address="bmc-gone"))
    with (
        _failing(httpx.ConnectError("[Errno 111] Connection refused"))() as driver,
        pytest.raises(
            DriverError, match=r"cannot reach the BMC \(ConnectError: \[Errno 111\] Connection refused\)"
        ) as caught,
    ):
        driver.power_state(host)
    assert type(caught.value) is DriverError
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_a_silent_bmc_is_a_driver_timeout_chained_from_httpx() -> None:
    host = make_host(Bmc(address="bmc-slow"))
    with (
        _failing(httpx.ReadTimeout("timed out"))() as driver,
        pytest.raises(DriverTimeout, match="no answer in time") as caught,
    ):
        driver.power_state(host)
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


def test_an_unreadable_ca_bundle_is_a_clear_error() -> None:
    host = make_host(Bmc(address="bmc", ca_bundle="/nonexistent/ca.pem"))
    with (
        RedfishPower(FakeSecrets({})) as driver,
        pytest.raises(DriverError, match=r"CA bundle '/nonexistent/ca\.pem'") as caught,
    ):
        driver.power_state(host)
    assert not caught.value.retryable


def test_a_bmc_answering_something_else_than_json(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)
    scripted.queue("GET", SYSTEM, httpx.Response(200, text="<html>login</html>"))
    with pytest.raises(DriverError, match="not a JSON object"):
        driver.power_state(host)


# --- Boot override ---


@pytest.mark.parametrize(
    ("device", "target"), [(BootDevice.PXE, "Pxe"), (BootDevice.CD, "Cd"), (BootDevice.DISK, "Hdd")]
)
def test_boot_once_patches_the_override(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host, device: BootDevice, target: str
) -> None:
    make_driver().boot_once(host, device)
    (patch,) = scripted.sent("PATCH", SYSTEM)
    assert patch.headers["Content-Type"] == "application/json"
    assert json.loads(patch.content) == {
        "Boot": {"BootSourceOverrideTarget": target, "BootSourceOverrideEnabled": "Once"}
    }
    assert scripted.system["Boot"]["BootSourceOverrideTarget"] == target


def test_boot_once_sends_the_etag_it_read_when_the_bmc_gives_one(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)  # discovery first: the next GET of the system is boot_once's own
    scripted.queue("GET", SYSTEM, json_response(200, scripted.system, {"ETag": 'W/"rev-41"'}))
    driver.boot_once(host, BootDevice.PXE)
    (patch,) = scripted.sent("PATCH", SYSTEM)
    assert patch.headers["If-Match"] == 'W/"rev-41"'
    # Without an ETag, no If-Match: a BMC that gives none would refuse a guessed one.
    make_driver().boot_once(host, BootDevice.CD)
    assert "If-Match" not in scripted.sent("PATCH", SYSTEM)[-1].headers


def test_boot_once_fails_when_the_target_does_not_read_back(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    driver = make_driver()
    driver.power_state(host)
    scripted.queue("PATCH", SYSTEM, httpx.Response(204))  # accepted, but ignored
    with pytest.raises(DriverError, match="accepted boot override Pxe but reads back 'None'"):
        driver.boot_once(host, BootDevice.PXE)


def test_boot_once_refuses_a_target_the_bmc_does_not_offer(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.system["Boot"]["BootSourceOverrideTarget@Redfish.AllowableValues"] = ["None", "Hdd"]
    with pytest.raises(DriverError, match=r"cannot boot from Pxe \(it offers None, Hdd\)") as caught:
        make_driver().boot_once(host, BootDevice.PXE)
    assert not caught.value.retryable
    assert scripted.sent("PATCH") == []


def test_boot_once_read_back_as_continuous_warns_but_succeeds(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.enabled_reads_continuous = True  # as sushy-tools does
    with caplog.at_level(logging.WARNING, logger="restore_flows.drivers.redfish"):
        make_driver().boot_once(host, BootDevice.PXE)
    assert scripted.system["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    assert "reads back boot override 'Continuous', not 'Once'" in caplog.text


# --- Virtual media ---


def test_insert_media_finds_the_cd_under_the_manager(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    url = "http://deploy.hospital.test/images/winpe.iso"
    driver = make_driver()
    driver.insert_media(host, url)
    (insert,) = scripted.sent("POST", CD + "/Actions/VirtualMedia.InsertMedia")
    assert insert.headers["Content-Type"] == "application/json"
    assert json.loads(insert.content) == {"Image": url, "Inserted": True, "WriteProtected": True}
    assert scripted.cd["Inserted"] is True
    driver.insert_media(host, url)  # already there: nothing to do
    assert len(scripted.sent("POST")) == 2  # the session and one insert
    driver.eject_media(host)
    assert scripted.cd["Inserted"] is False
    driver.eject_media(host)
    assert len(scripted.sent("POST", CD + "/Actions/VirtualMedia.EjectMedia")) == 1


def test_insert_media_replaces_another_image(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.cd.update(Image="http://old/iso", Inserted=True)
    make_driver().insert_media(host, "http://new/iso")
    assert [r.url.path.rsplit(".", 1)[-1] for r in scripted.sent("POST") if "VirtualMedia" in r.url.path] == [
        "EjectMedia",
        "InsertMedia",
    ]
    assert scripted.cd["Image"] == "http://new/iso"


def test_media_that_never_shows_times_out_without_url_credentials(
    make_driver: MakeDriver, scripted: ScriptedBmc, host: Host
) -> None:
    scripted.queue("POST", CD + "/Actions/VirtualMedia.InsertMedia", httpx.Response(204))  # accepted, ignored
    with pytest.raises(DriverTimeout) as caught:
        make_driver().insert_media(host, "https://deploy:t0ken@deploy.hospital.test/winpe.iso")
    assert caught.value.detail == (
        "BMC at https://bmc-icu-01.hospital.test did not report media https://deploy.hospital.test/winpe.iso "
        "inserted within 15 s (last: Inserted=False, Image=None)"
    )


def test_no_virtual_cd_is_a_clear_error(make_driver: MakeDriver, scripted: ScriptedBmc, host: Host) -> None:
    scripted.cd["MediaTypes"] = ["USBStick"]
    with pytest.raises(DriverError, match="offers no virtual CD/DVD drive"):
        make_driver().insert_media(host, "http://x/iso")


def test_not_found_is_its_own_error(make_driver: MakeDriver, scripted: ScriptedBmc, host: Host) -> None:
    scripted.system["Links"]["ManagedBy"] = [{"@odata.id": "/redfish/v1/Managers/Gone"}]
    with pytest.raises(RedfishNotFound) as caught:
        make_driver().insert_media(host, "http://x/iso")
    assert not caught.value.retryable


# --- Secrets stay secret ---


def test_no_secret_reaches_an_error_or_a_log(
    scripted: ScriptedBmc, clock: FakeClock, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    password = scripted.password
    echoes = f"login for admin with {password} refused"
    caplog.set_level(logging.DEBUG)
    errors: list[DriverError] = []
    transport = httpx.MockTransport(scripted.handle)

    def attempt(secret: str) -> None:
        driver = RedfishPower(
            FakeSecrets({SECRET_NAME: secret}),
            client_factory=lambda bmc: httpx.Client(transport=transport),
            clock=clock,
            sleep=clock.sleep,
        )
        with driver:
            try:
                driver.power_cycle(host)
            except DriverError as exc:
                errors.append(exc)

    # A BMC that echoes the password in its error message.
    scripted.queue(
        "POST", SESSIONS, json_response(401, {"error": {"@Message.ExtendedInfo": [{"Message": echoes}]}})
    )
    attempt(f"admin:{password}")
    attempt("admin:another-Secret-123")
    scripted.sessions = False  # basic auth: the password travels in every request header
    scripted.queue("POST", RESET, json_response(500, {"error": {"message": echoes}}))
    attempt(f"admin:{password}")
    assert [type(error) for error in errors] == [RedfishAccessError, RedfishAccessError, RedfishServerError]
    texts = [text for error in errors for text in (str(error), repr(error), *getattr(error, "messages", ()))]
    assert sum("**********" in text for text in texts) >= 2  # the echoes, scrubbed
    everything = "\n".join(texts) + caplog.text
    for secret in (password, "another-Secret-123", base64.b64encode(f"admin:{password}".encode()).decode()):
        assert secret not in everything
