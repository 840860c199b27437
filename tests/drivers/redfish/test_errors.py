"""Redfish error bodies and status codes into the driver's errors: pure functions, recorded payloads."""

from __future__ import annotations

import httpx
import pytest

from restore_flows.drivers.redfish import (
    RedfishAccessError,
    RedfishConflict,
    RedfishError,
    RedfishNotFound,
    RedfishServerError,
    base_url,
    redfish_messages,
    status_error,
)
from restore_flows.inventory.models import Stage
from tests.drivers.redfish.scripted_bmc import payload


def response(status: int, name: str | None = None, text: str | None = None) -> httpx.Response:
    if name is not None:
        return httpx.Response(status, json=payload(name))
    return httpx.Response(status, text=text or "")


def test_extended_info_messages_are_read_with_their_ids() -> None:
    assert redfish_messages(response(400, "error_400_value_not_in_list")) == [
        "The value 'GracefulShutdown' for the parameter ResetType in the action ComputerSystem.Reset is not "
        "in the list of acceptable values. (Base.1.16.ActionParameterValueNotInList)",
        "The action ComputerSystem.Reset is not supported by the resource. (Base.1.16.ActionNotSupported)",
    ]


def test_sushy_error_without_extended_messages_falls_back_to_error_message() -> None:
    # sushy-tools' ExtendedInfo has a MessageId but no Message: the top-level message is what it says.
    assert redfish_messages(response(501, "sushy_error_501")) == ["Power state PowerCycle is not supported"]


def test_a_body_that_is_not_redfish_is_quoted_briefly() -> None:
    assert redfish_messages(response(502, text="<html>Bad gateway</html>" + "x" * 500)) == [
        ("<html>Bad gateway</html>" + "x" * 500)[:200]
    ]
    assert redfish_messages(response(500, text="")) == []
    assert redfish_messages(httpx.Response(500, json={"unexpected": True})) == []


@pytest.mark.parametrize(
    ("status", "name", "kind", "retryable"),
    [
        (401, "error_401_no_valid_session", RedfishAccessError, False),
        (403, "error_403_insufficient_privilege", RedfishAccessError, False),
        (404, None, RedfishNotFound, False),
        (409, "error_409_resource_in_use", RedfishConflict, True),
        (400, "error_400_value_not_in_list", RedfishError, False),
        (500, "error_500_internal", RedfishServerError, True),
        (503, None, RedfishServerError, True),
        (501, "sushy_error_501", RedfishServerError, False),
        (429, None, RedfishError, True),
    ],
)
def test_status_codes_map_to_a_small_family(
    status: int, name: str | None, kind: type[RedfishError], retryable: bool
) -> None:
    error = status_error("srv-1", Stage.WIPE, "BMC at https://bmc: POST /x", response(status, name))
    assert type(error) is kind
    assert error.retryable is retryable
    assert error.status == status
    assert error.stage is Stage.WIPE
    assert error.host == "srv-1"
    assert str(error).startswith(f"srv-1: wipe: BMC at https://bmc: POST /x: HTTP {status} ")


def test_the_detail_carries_the_bmc_message_and_scrubs_echoed_secrets() -> None:
    body = {"error": {"@Message.ExtendedInfo": [{"Message": "bad password hunter2 for root"}]}}
    error = status_error(
        "srv-1",
        Stage.REIMAGE,
        "where",
        httpx.Response(401, json=body),
        scrub=lambda text: text.replace("hunter2", "***"),
    )
    assert error.detail == "where: HTTP 401 Unauthorized: bad password *** for root"
    assert error.messages == ("bad password *** for root",)


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("bmc-01.hospital.test", "https://bmc-01.hospital.test"),
        ("10.1.2.3", "https://10.1.2.3"),
        ("fd00::12", "https://[fd00::12]"),
        ("https://10.1.2.3:8443/", "https://10.1.2.3:8443"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ],
)
def test_base_url(address: str, url: str) -> None:
    assert base_url(address) == url


@pytest.mark.parametrize("address", ["https://root:calvin@10.1.2.3", "ftp://10.1.2.3", "https://"])
def test_base_url_refuses_credentials_and_other_schemes(address: str) -> None:
    with pytest.raises(ValueError, match=r"credentials|not an http") as caught:
        base_url(address)
    assert "calvin" not in str(caught.value)
