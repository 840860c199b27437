"""Procedure steps through Prefect: a time-scaled campaign runs them in order, with their wait, and a
step's named approval is asked on its own form when it is due, answered as the UI's Resume does."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from restore_flows.execution.eta import as_utc
from restore_flows.flows.server import PrefectServer
from restore_flows.states import HostState, StepEvent, StepState
from tests.flows.served import (
    Served,
    answer_form,
    api_client,
    eventually,
    final_state,
    latest_artifact,
    serve_inventory,
    start_run,
)
from tests.inventory.procedure_estate import ESTATE, STEPS

pytestmark = pytest.mark.slow

# Each planned minute takes 0.0005 * 60 s: the 10 h between the resets takes 18 s.
SCALE = 0.0005


@pytest.fixture
def served(prefect_api: PrefectServer, tmp_path: Path) -> Iterator[Served]:
    steps = STEPS.replace(
        "    generates: [KRBTGT_PASSWORD]\n", "    generates: [KRBTGT_PASSWORD]\n    approval: true\n"
    )
    assert "approval: true" in steps
    serving = serve_inventory(prefect_api, tmp_path, estate=ESTATE, steps=steps)
    yield serving
    serving.stop()


def test_a_campaign_asks_for_the_reset_when_due_and_runs_the_steps_in_order(served: Served) -> None:
    run_id = start_run(served, "restore-estate/restore-estate", ask_approval=True, time_scale=SCALE)
    ledger = served.ledger()
    with api_client(served.server) as client:

        def paused() -> bool:
            state = client.read_flow_run(run_id).state
            return state is not None and state.is_paused()

        assert eventually(paused, 120)
        waves = {
            "approver": "Dr. Ada Osei",
            "waves": ["core", "icu", "rest"],
            "confirm_waves": "core, icu, rest",
        }
        assert answer_form(client, run_id, waves).status.value == "ACCEPT"
        # The reset is asked for once the DC is verified: its own form, the step's name typed again.
        assert eventually(paused, 120)
        assert ledger.states()["dc-01"] is HostState.VERIFIED_CLEAN
        assert ledger.steps.step("reset-1").state is StepState.PENDING
        assert "reset-1" in latest_artifact(served, "approval-needed")
        step = {"approver": "Dr. B. Mensah", "confirm_wave": "reset-1"}
        assert answer_form(client, run_id, step).status.value == "ACCEPT"
    state = final_state(served, run_id, timeout=300)
    assert state.is_completed(), state.message
    assert set(ledger.states().values()) == {HostState.ONLINE}
    log = {n: ledger.steps.history(n).log for n in ("reset-1", "reset-2", "vault")}
    started = {
        n: [as_utc(e.at) for e in entries if e.event == StepEvent.START.value] for n, entries in log.items()
    }
    done = {
        n: [as_utc(e.at) for e in entries if e.event == StepEvent.SUCCEED.value] for n, entries in log.items()
    }
    assert {n: len(v) for n, v in started.items()} == {"reset-1": 1, "reset-2": 1, "vault": 1}
    assert started["reset-2"][0] - done["reset-1"][0] >= dt.timedelta(minutes=600 * SCALE)
    assert started["vault"][0] >= done["reset-1"][0]
    released = as_utc(ledger.history("ws-icu-1").transitions[-1].at)
    assert released >= done["reset-1"][0]
    assert [(a.scope, a.approver) for a in ledger.steps.history("reset-1").approvals] == [
        ("step:reset-1", "Dr. B. Mensah")
    ]
    summary = latest_artifact(served, "run-summary")
    assert "## Procedure steps" in summary
    assert "| reset-2 | done |" in summary
