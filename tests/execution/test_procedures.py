"""Procedure steps in runs: in order, with their waits and gates, once, and without leaking a secret."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.drivers.procedures import StepOutput, fingerprint
from restore_flows.errors import LedgerError
from restore_flows.execution.campaign import CampaignSettings, Named, Status
from restore_flows.execution.eta import as_utc
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from restore_flows.inventory.procedures import ProcedureStep
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.scheduling.forecast import forecast
from restore_flows.scheduling.runner import Retries
from restore_flows.states import HostState, StepEvent, StepState
from tests.conftest import WriteInventory
from tests.execution.conftest import run_threads
from tests.inventory.procedure_estate import ESTATE, STEPS

# A wait of 600 planned minutes takes 600 * PACE real minutes: 1.8 s.
PACE = 0.00005
SETTINGS = CampaignSettings(retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.02, pace=PACE)


@pytest.fixture
def steps_plan(write_inventory: WriteInventory) -> Plan:
    return plan(load_estate(write_inventory(estate=ESTATE, steps=STEPS)))


@pytest.fixture
def real_ledger(engine: Engine, steps_plan: Plan) -> Ledger:
    # The ledger's own clock: the waits between steps are read from its stamps.
    ledger = Ledger(engine)
    ledger.sync_inventory(steps_plan.estate, steps_plan)
    return ledger


class Recording(SimulatedFleet):
    """The simulated fleet, keeping what each step was handed, to look for it everywhere else."""

    def __init__(self) -> None:
        super().__init__()
        self.handed: dict[str, list[str]] = {}

    def run_step(self, step: ProcedureStep, secrets: Mapping[str, str]) -> StepOutput:
        self.handed.setdefault(step.name, []).extend(secrets.values())
        return super().run_step(step, secrets)


def _finished(ledger: Ledger, step: str) -> dt.datetime:
    [done] = [e.at for e in ledger.steps.history(step).log if e.event == StepEvent.SUCCEED.value]
    return as_utc(done)


def _started(ledger: Ledger, step: str) -> list[dt.datetime]:
    return [as_utc(e.at) for e in ledger.steps.history(step).log if e.event == StepEvent.START.value]


def _released(ledger: Ledger, host: str) -> dt.datetime:
    return as_utc(ledger.history(host).transitions[-1].at)


def test_the_forecast_counts_the_wait_between_the_two_resets(steps_plan: Plan) -> None:
    found = forecast(steps_plan)
    start_1, finish_1 = found.step_times("reset-1")
    start_2, finish_2 = found.step_times("reset-2")
    assert start_1 is not None
    assert finish_1 is not None
    assert start_2 is not None
    assert finish_2 is not None
    assert start_2 >= finish_1 + 600
    # fs-01 is released only after reset-2: the whole campaign waits for the gap.
    assert found.finish["fs-01"] >= finish_2
    makespan = found.makespan_minutes
    assert makespan is not None
    assert makespan >= finish_1 + 600
    as_json = found.to_json()["procedures"]
    assert as_json["reset-2"]["start_minutes"] >= as_json["reset-1"]["finish_minutes"] + 600
    # Without the procedures the same estate is back far sooner: the gap is what costs.
    bare = plan(replace(steps_plan.estate, procedures={}))
    without = forecast(bare).makespan_minutes
    assert without is not None
    assert without < makespan - 500


def test_a_campaign_runs_the_steps_in_order_with_their_waits(real_ledger: Ledger, steps_plan: Plan) -> None:
    fleet = Recording()
    _, summary = run_threads(real_ledger, steps_plan, fleet, settings=SETTINGS)
    assert summary.ok, summary
    assert {s.step: s.status for s in summary.steps.values()} == dict.fromkeys(
        ("reset-1", "reset-2", "vault"), Status.ONLINE
    )
    assert all(r.state is StepState.DONE for r in real_ledger.steps.states().values())
    reset_1, reset_2 = _finished(real_ledger, "reset-1"), _finished(real_ledger, "reset-2")
    [started_2] = _started(real_ledger, "reset-2")
    assert started_2 - reset_1 >= dt.timedelta(minutes=600 * PACE)
    assert _started(real_ledger, "vault")[0] >= reset_1
    # The gates: the DC and the workstations are released only after reset-1, the file server after
    # reset-2; the DC's restore and verify ran before the step (which needs them).
    for host in ("dc-01", "ws-icu-1", "ws-icu-3"):
        assert _released(real_ledger, host) >= reset_1, host
    assert _released(real_ledger, "fs-01") >= reset_2
    verified = [
        t.at for t in real_ledger.history("dc-01").transitions if t.to_state is HostState.VERIFIED_CLEAN
    ]
    assert as_utc(verified[0]) <= _started(real_ledger, "reset-1")[0]
    # Each ran once, and reset-1 rotated its secret: only the fingerprint is kept.
    assert {n: len(_started(real_ledger, n)) for n in ("reset-1", "reset-2", "vault")} == {
        "reset-1": 1,
        "reset-2": 1,
        "vault": 1,
    }
    [rotation] = real_ledger.steps.rotations()
    assert rotation.secret == "KRBTGT_PASSWORD"
    assert rotation.fingerprint == fingerprint(fleet.handed["reset-1"][0])


def test_no_generated_secret_reaches_the_ledger_the_logs_or_the_summary(
    real_ledger: Ledger, steps_plan: Plan, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Recording()
    caplog.set_level(logging.DEBUG)
    _, summary = run_threads(real_ledger, steps_plan, fleet, settings=SETTINGS)
    assert summary.ok
    [secret] = fleet.handed["reset-1"]
    assert len(secret) >= 32
    database = Path(str(engine.url.database))
    stored = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert secret.encode() not in stored
    assert secret not in caplog.text
    assert secret not in repr(summary)
    history = real_ledger.steps.history("reset-1")
    assert secret not in repr(history)


def test_a_step_that_needs_a_named_approval_waits_for_one(real_ledger: Ledger, steps_plan: Plan) -> None:
    approval = ("reset-1", "reset-2")
    needing = plan_with_approval(steps_plan, approval)
    real_ledger.sync_inventory(needing.estate, needing)
    _, refused = run_threads(
        real_ledger, needing, SimulatedFleet(), approver="Dr. A. Osei", settings=SETTINGS
    )
    assert not refused.ok
    assert refused.steps["reset-1"].status is Status.BLOCKED
    assert "--approve-step reset-1" in (refused.steps["reset-1"].reason or "")
    assert _started(real_ledger, "reset-1") == []
    # What it gates waits with it; the DC it needs went as far as the step allows: verified, in quarantine.
    assert refused.hosts["ws-icu-1"].status is Status.BLOCKED
    assert real_ledger.states()["dc-01"] is HostState.VERIFIED_CLEAN
    approver = Named("Dr. A. Osei", approval)
    _, approved = run_threads(real_ledger, needing, SimulatedFleet(), approver=approver, settings=SETTINGS)
    assert approved.ok, approved
    shown = {a.scope: a.approver for a in real_ledger.steps.history("reset-1").approvals}
    assert shown == {"step:reset-1": "Dr. A. Osei"}


def test_a_step_that_may_have_run_is_never_run_again_without_an_operator(
    real_ledger: Ledger, steps_plan: Plan
) -> None:
    broken = SimulatedFleet(broken_steps=frozenset({"reset-1"}))
    _, first = run_threads(real_ledger, steps_plan, broken, settings=SETTINGS)
    assert first.steps["reset-1"].status is Status.FAILED
    assert real_ledger.steps.step("reset-1").state is StepState.FAILED
    # The next run leaves it alone: it may have reset the key.
    _, second = run_threads(real_ledger, steps_plan, SimulatedFleet(), settings=SETTINGS)
    assert second.steps["reset-1"].status is Status.FAILED
    assert "re-arms" in (second.steps["reset-1"].error or "")
    assert len(_started(real_ledger, "reset-1")) == 1
    # An operator re-arms it, with a reason: then, and only then, it runs once more.
    real_ledger.steps.decide(
        "reset-1", StepEvent.REARM, actor="A. Osei", reason="the script failed before the reset"
    )
    _, third = run_threads(real_ledger, steps_plan, SimulatedFleet(), settings=SETTINGS)
    assert third.ok, third
    assert len(_started(real_ledger, "reset-1")) == 2


def plan_with_approval(the_plan: Plan, names: tuple[str, ...]) -> Plan:
    procedures = {n: replace(step, approval=n in names) for n, step in the_plan.estate.procedures.items()}
    return replace(the_plan, estate=replace(the_plan.estate, procedures=procedures))


def _run_worker(directory: Path, url: str, *, time_scale: float, pace: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("steps_worker.py")),
            str(directory),
            url,
            str(time_scale),
            str(pace),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )


def _kill_when(process: subprocess.Popen[str], ledger: Ledger, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the condition never came"
        time.sleep(0.02)  # polling the ledger, not timing: the kill lands wherever the run is
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()


def _state(ledger: Ledger, step: str) -> StepState:
    return ledger.steps.step(step).state


# Stages and steps take a second or two; the 10 h between the resets takes 600 * WAIT_PACE min = 7 s.
SCALE = 0.0015
WAIT_PACE = 0.0002


@pytest.mark.parametrize("moment", ["during reset-1", "between the resets"])
def test_kill_9_between_or_during_steps_never_repeats_a_reset(
    write_inventory: WriteInventory, tmp_path: Path, moment: str
) -> None:
    directory = write_inventory(estate=ESTATE, steps=STEPS)
    url = f"sqlite:///{tmp_path / 'kill.sqlite3'}"
    engine = make_engine(url)
    upgrade(engine)
    ledger = Ledger(engine)
    worker = _run_worker(directory, url, time_scale=SCALE, pace=WAIT_PACE)
    if moment == "during reset-1":
        _kill_when(worker, ledger, lambda: _has_step(ledger, "reset-1", StepState.RUNNING))
    else:
        _kill_when(
            worker,
            ledger,
            lambda: (
                _has_step(ledger, "reset-1", StepState.DONE)
                and _state(ledger, "reset-2") is StepState.PENDING
            ),
        )
    again = _run_worker(directory, url, time_scale=SCALE, pace=WAIT_PACE)
    out, err = again.communicate(timeout=300)
    if moment == "during reset-1":
        # It may have reset the key: the next run does not run it again, and says who must decide.
        assert "not complete" in out, err
        assert _state(ledger, "reset-1") is StepState.INTERRUPTED
        assert "restore decide rearm|done_by_hand reset-1" in err
        assert len(_started(ledger, "reset-1")) == 1
        ledger.steps.decide(
            "reset-1", StepEvent.DONE_BY_HAND, actor="A. Osei", reason="the DC's event log shows the reset"
        )
        out, err = _run_worker(directory, url, time_scale=SCALE, pace=WAIT_PACE).communicate(timeout=300)
    assert " ok" in out, err
    assert all(r.state is StepState.DONE for r in ledger.steps.states().values())
    assert len(_started(ledger, "reset-1")) == 1
    assert len(_started(ledger, "reset-2")) == 1
    [started_2] = _started(ledger, "reset-2")
    assert started_2 - _done_at(ledger, "reset-1") >= dt.timedelta(minutes=600 * WAIT_PACE)
    engine.dispose()


def _has_step(ledger: Ledger, step: str, state: StepState) -> bool:
    try:
        return _state(ledger, step) is state
    except LedgerError:  # not enrolled yet: the worker is starting
        return False


def _done_at(ledger: Ledger, step: str) -> dt.datetime:
    # Done by the run, or by hand: the wait counts from when it was done.
    [done] = [
        e.at
        for e in ledger.steps.history(step).log
        if e.event in (StepEvent.SUCCEED.value, StepEvent.DONE_BY_HAND.value)
    ]
    return as_utc(done)


def test_the_sample_forest_recovery_runs_in_order_on_the_virtual_clock() -> None:
    the_plan = plan(load_estate(Path("inventory")))
    found = forecast(the_plan)
    steps = the_plan.estate.procedures
    times = {name: found.step_times(name) for name in steps}
    for name, step in steps.items():
        start, _ = times[name]
        assert start is not None, name
        for need in step.needs:
            if need.name in steps:
                assert start >= (times[need.name][1] or 0.0), (name, need.name)
    start_2, _ = times["krbtgt-reset-2"]
    assert start_2 is not None
    assert start_2 >= (times["krbtgt-reset-1"][1] or 0.0) + 600
    # No workstation is released before the first reset and the privileged accounts' reset; remote
    # access and mail not before the second.
    first = max(times[n][1] or 0.0 for n in ("krbtgt-reset-1", "privileged-accounts-reset"))
    hosts = the_plan.estate.hosts
    for name, host in hosts.items():
        if host.kind.value == "workstation":
            assert found.starts[(name, Stage.RELEASE)] >= first, name
        if host.role in ("citrix-storefront", "mail"):
            assert found.starts[(name, Stage.RELEASE)] >= (times["krbtgt-reset-2"][1] or 0.0), name
    assert found.starts[("dc-dc1-01", Stage.RELEASE)] >= (times["krbtgt-reset-1"][1] or 0.0)
