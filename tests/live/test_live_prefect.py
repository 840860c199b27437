"""A live wave as ops start it: the `restore-wave` deployment with mode=live, approved through the form's
API, against the real peers of :mod:`tests.live.estate`. Nothing of a secret may reach Prefect: not its
logs (the drivers' and libraries' loggers are sent to it at DEBUG here), not its artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)

from restore_flows.flows.server import PrefectServer
from restore_flows.states import HostState
from tests.flows.served import Served, answer_form, api_client, eventually, final_state, start_run
from tests.live.estate import BMC_PASSWORD, DEPLOY_TOKEN, LiveEstate, live_estate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
HOSTS = ["gw-01", "gw-13", "ws-01"]


@pytest.fixture
def live(prefect_api: PrefectServer, tmp_path: Path) -> Iterator[tuple[LiveEstate, Served]]:
    with live_estate(tmp_path) as estate:
        env = prefect_api.client_env()
        env.update(estate.environment)
        env.update(
            RESTORE_INVENTORY=str(estate.inventory),
            PYTHONUNBUFFERED="1",
            # Send the drivers' and their libraries' logs to Prefect too, at every level: the test then
            # reads them back to show that no secret is in them.
            PREFECT_LOGGING_EXTRA_LOGGERS="restore_flows,paramiko,httpx",
            PREFECT_LOGGING_LEVEL="DEBUG",
            PREFECT_LOGGING_ROOT_LEVEL="DEBUG",
        )
        env.pop("PYTHONWARNINGS", None)
        upgraded = subprocess.run(
            [sys.executable, "-m", "restore_flows", "db", "upgrade"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert upgraded.returncode == 0, upgraded.stderr
        serving = Served(prefect_api, env, estate.environment["RESTORE_DATABASE_URL"], tmp_path / "serve.log")
        serving.start()
        try:
            yield estate, serving
        finally:
            serving.stop()


def test_a_live_wave_from_the_deployment_with_its_approval_form(live: tuple[LiveEstate, Served]) -> None:
    estate, served = live
    run_id = start_run(served, "restore-wave/restore-wave", wave="icu", mode="live", hosts=HOSTS)
    with api_client(served.server) as client:
        paused = eventually(lambda: (r := client.read_flow_run(run_id)).state and r.state.is_paused(), 120)
        assert paused
        answer = answer_form(client, run_id, {"approver": "Dr. Ada Osei", "confirm_wave": "icu"})
        assert answer.status.value == "ACCEPT"
    state = final_state(served, run_id, timeout=240)
    assert state.is_failed()  # one host is quarantined, by design
    assert state.message == "wave icu: 1 failed, 0 blocked, 2 online"
    ledger = served.ledger()
    assert ledger.states(HOSTS) == {
        "gw-01": HostState.ONLINE,
        "gw-13": HostState.QUARANTINED,
        "ws-01": HostState.ONLINE,
    }
    approval = ledger.history("gw-01").approvals[0]
    assert (approval.approver, approval.automatic) == ("Dr. Ada Osei", False)

    with api_client(served.server) as client:
        flow_run = LogFilterFlowRunId(any_=[run_id])
        logs = "\n".join(
            f"{log.name}: {log.message}" for log in client.read_logs(LogFilter(flow_run_id=flow_run))
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    published = logs + "\n".join(json.dumps(a.data) + (a.description or "") for a in artifacts)
    key_lines = [line for line in estate.client_key.splitlines() if line and "-----" not in line]
    for secret in [BMC_PASSWORD, DEPLOY_TOKEN, *key_lines]:
        assert secret not in published
    # The capture is not empty: the drivers' own debug lines and the wave's artifacts are there.
    names = {line.split(":", 1)[0] for line in logs.splitlines()}
    assert "restore_flows.drivers.ssh" in names, names
    assert any(a.key == "run-summary" for a in artifacts)
