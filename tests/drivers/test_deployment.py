"""The deployment-server client against the test deployment server on loopback, and its error mapping."""

from __future__ import annotations

import datetime as dt
import itertools

import httpx
import pytest
from pydantic import SecretStr

from restore_flows.drivers.base import DriverError, DriverTimeout
from restore_flows.drivers.deployment import DeploymentServerClient, Phase, wait_for_phase
from restore_flows.drivers.fake import FakeDeployment
from restore_flows.inventory.models import Stage
from tests.peers.deploy import deploy_server


def test_jobs_run_when_the_system_boots_from_the_network() -> None:
    state = FakeDeployment(new_host_key=lambda host: f"ssh-ed25519 KEY-{host}")
    with deploy_server(state, {"System-A": "gw-01"}) as server, httpx.Client(base_url=server.url) as http:
        client = DeploymentServerClient(http, token=SecretStr("t0ken"))
        assert client.status("gw-01") is None
        job = client.assign("gw-01", "win2022-gold-7", "52:54:00:aa:bb:01")
        status = client.status("gw-01")
        assert status is not None
        assert (status.job, status.phase) == (job, Phase.ASSIGNED)

        # Setting the override while on, or booting from disk, is no network boot; Off -> On with Pxe is.
        def notify(power: str, target: str) -> None:
            record = {"name": "System-A", "uuid": "4202ef31", "power_state": power, "boot_device": target}
            http.put(server.notify_url, json=record)

        notify("On", "Pxe")
        notify("Off", "Hdd")
        notify("On", "Hdd")
        assert client.status("gw-01").phase is Phase.ASSIGNED  # type: ignore[union-attr]
        notify("Off", "Pxe")
        notify("On", "Pxe")
        done = wait_for_phase(
            client,
            "gw-01",
            Phase.INSTALLED,
            job=job,
            stage=Stage.REIMAGE,
            timeout=1,
            poll=0,
            clock=lambda: 0.0,
            sleep=lambda s: None,
        )
        assert (done.image_id, done.host_key) == ("win2022-gold-7", "ssh-ed25519 KEY-gw-01")
        # A later job is a new job: the old one's "installed" does not count for it.
        second = client.assign("gw-01", "win2022-gold-7", None)
        assert second != job
        ticks = itertools.count()
        with pytest.raises(DriverTimeout, match="did not report installed within 5 s"):
            wait_for_phase(
                client,
                "gw-01",
                Phase.INSTALLED,
                job=second,
                stage=Stage.REIMAGE,
                timeout=5,
                poll=0,
                clock=lambda: float(next(ticks)),
                sleep=lambda s: None,
            )


def _mock(status: int, body: object) -> DeploymentServerClient:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer s3cret-token"
        return httpx.Response(status, json=body)

    http = httpx.Client(base_url="http://deploy.test", transport=httpx.MockTransport(handler))
    return DeploymentServerClient(http, token=SecretStr("s3cret-token"))


def test_errors_are_clear_and_never_show_the_token() -> None:
    with pytest.raises(DriverError, match="refused the credentials") as refused:
        _mock(401, {"error": "bad token"}).status("gw-01")
    assert not refused.value.retryable
    with pytest.raises(DriverError, match="answered 503") as down:
        _mock(503, {"error": "busy"}).assign("gw-01", "img", None)
    assert down.value.retryable
    with pytest.raises(DriverError, match="unreadable status"):
        _mock(200, {"phase": "dancing", "job": "1", "changed_at": "2026-11-29T08:00:00+00:00"}).status(
            "gw-01"
        )
    for error in (refused.value, down.value):
        assert "s3cret-token" not in str(error)


def test_a_failed_job_fails_the_wait() -> None:
    state = FakeDeployment(fail={"gw-02"}, clock=lambda: dt.datetime(2026, 11, 29, tzinfo=dt.UTC))
    job = state.assign("gw-02", "img", None)
    state.network_boot("gw-02")
    with pytest.raises(DriverError, match="reports failure: simulated install failure"):
        wait_for_phase(
            state,
            "gw-02",
            Phase.WIPED,
            job=job,
            stage=Stage.WIPE,
            timeout=1,
            poll=0,
            clock=lambda: 0.0,
            sleep=lambda s: None,
        )
