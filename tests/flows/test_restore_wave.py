"""The restore flows against a real Prefect server, driven through its API as the UI does.

One server for the session (started by the ``prefect_api`` fixture); each test serves the deployments
from its own process with its own inventory and rehearsal ledger, creates runs the way the UI's Run
button does, answers approval forms through the API, and checks the ledger and the artifacts.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.schemas.filters import (
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Scheduled
from sqlalchemy import select

from restore_flows.flows.server import PrefectServer
from restore_flows.ledger.audit import audit
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.tables import PoolClaimRow
from restore_flows.states import HostState
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

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

ESTATE = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: lab, services: [lab]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
pools:
  - {name: imaging-arl, capacity: 1}
roles:
  - {name: dc, kind: server, services: [identity]}
  - {name: gw, kind: server, services: [icu], depends_on: [dc-01]}
  - name: icu-ws
    kind: workstation
    services: [icu]
    depends_on: [gw-01]
    pools: {reimage: [imaging-arl]}
  - name: lab-ws
    kind: workstation
    services: [lab]
    pools: {reimage: [imaging-arl]}
hosts:
  - {name: dc-01, role: dc, site: arl, forensic_hold: true}
  - {name: gw-01, role: gw, site: arl}
  - {name: gw-02, role: gw, site: arl}
groups:
  - defaults: {role: icu-ws, site: arl}
    hosts:
      - name: ws-icu-[01:06]
      - {name: ws-icu-07, depends_on: [gw-02]}
  - defaults: {role: lab-ws, site: arl}
    hosts:
      - name: ws-lab-[01:06]
"""


@pytest.fixture
def served(prefect_api: PrefectServer, tmp_path: Path) -> Iterator[Served]:
    serving = serve_inventory(prefect_api, tmp_path, estate=ESTATE)
    yield serving
    serving.stop()


def test_clean_waves_with_artifacts(served: Served) -> None:
    core = final_state(served, start_run(served, "restore-wave/restore-wave", wave="core"))
    assert core.is_completed(), core.message
    icu = final_state(served, start_run(served, "restore-wave/restore-wave", wave="icu"))
    assert icu.is_completed(), icu.message
    assert icu.message == "wave icu: all 9 host(s) online"
    ledger = served.ledger()
    states = ledger.states()
    assert all(states[n] is HostState.ONLINE for n in states if n.startswith(("gw", "ws-icu", "dc")))
    assert latest_artifact(served, "wave-icu-progress") == 100.0
    assert float(latest_artifact(served, "estate-progress")) == pytest.approx(100 * 10 / 16, abs=0.1)
    assert "all online" in latest_artifact(served, "run-summary")
    assert "ws-icu" not in latest_artifact(served, "run-summary")  # no failures listed
    assert '"site": "arl"' in latest_artifact(served, "run-sites")
    assert "| icu | 100.0 % | 0 s |" in latest_artifact(served, "run-eta")
    status = final_state(served, start_run(served, "restore-status/restore-status", mode="rehearsal"))
    assert status.message == f"{round(100 * 10 / 16, 1)}% of the estate online"
    rows = json.loads(latest_artifact(served, "estate-status"))
    assert [(r["wave"], r["online"], r["total"]) for r in rows][:3] == [
        ("core", 1, 1),
        ("icu", 9, 9),
        ("lab", 0, 6),
    ]
    assert rows[1]["ETA"] == "0 s"
    assert rows[2]["ETA"].endswith(("s", "min", "h"))  # the forecast, at the pace seen so far
    history = ledger.history("dc-01")
    assert history.approvals[0].automatic
    assert [e.run_id for e in history.evidence] == [history.transitions[1].run_id]


def test_injected_failure_blocks_dependents_and_fails_the_run(served: Served) -> None:
    assert final_state(served, start_run(served, "restore-wave/restore-wave", wave="core")).is_completed()
    run_id = start_run(served, "restore-wave/restore-wave", wave="icu", broken_hosts=["gw-02"])
    state = final_state(served, run_id)
    assert state.is_failed()
    with api_client(served.server) as client:
        # Engineers see in the run's logs why a host did not move.
        def logged() -> bool:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return any(log.message.startswith("ws-icu-07: blocked: gw-02") for log in logs)

        assert eventually(logged, timeout=30)
    assert state.message == "wave icu: 1 failed, 1 blocked, 7 online"
    summary = latest_artifact(served, "run-summary")
    assert "| gw-02 | wipe_failed | gw-02: wipe: simulated permanent failure |" in summary
    assert "| ws-icu-07 | blocked: gw-02 gw-02: wipe: simulated permanent failure" in summary
    ledger = served.ledger()
    assert ledger.host("ws-icu-07").state is HostState.REIMAGED  # as far as it goes without gw-02
    assert ledger.host("ws-icu-01").state is HostState.ONLINE


def test_approval_through_the_api_is_recorded(served: Served) -> None:
    run_id = start_run(served, "restore-wave/restore-wave", wave="core", ask_approval=True)
    with api_client(served.server) as client:
        paused = eventually(lambda: (r := client.read_flow_run(run_id)).state and r.state.is_paused(), 120)
        assert paused
        assert served.ledger().history("dc-01").transitions[-1].event == "enroll"  # nothing before
        wrong = answer_form(client, run_id, {"approver": "", "confirm_wave": "core"})
        assert wrong.status.value == "REJECT"  # the server checks the form
        answer = answer_form(client, run_id, {"approver": "Dr. Ada Osei", "confirm_wave": "core"})
        assert answer.status.value == "ACCEPT"
    state = final_state(served, run_id)
    assert state.is_completed(), state.message
    approval = served.ledger().history("dc-01").approvals[0]
    assert (approval.approver, approval.automatic) == ("Dr. Ada Osei", False)
    assert "dc-01: evidence NOT yet registered" in approval.shown


def test_approval_timeout_wipes_nothing(served: Served) -> None:
    run_id = start_run(
        served, "restore-wave/restore-wave", wave="core", ask_approval=True, approval_timeout_minutes=0.05
    )
    assert final_state(served, run_id).is_failed()
    # The server's pause-expiry service may fail the run first, in its own words; the flow then
    # replaces them with its own, which say that nothing was wiped.
    with api_client(served.server) as client:
        ours = eventually(
            lambda: (
                (s := client.read_flow_run(run_id).state) is not None
                and s.is_failed()
                and (s.message or "").startswith("no approval within 0.05 minutes")
                and s
            ),
            60,
        )
    assert ours
    history = served.ledger().history("dc-01")
    assert [t.event for t in history.transitions] == ["enroll"]
    assert history.approvals == ()


def test_overlapping_runs_share_the_pool_icu_first(served: Served) -> None:
    assert final_state(served, start_run(served, "restore-wave/restore-wave", wave="core")).is_completed()
    # Both waves reimage through one imaging slot; each reimage takes a moment of real time.
    lab = start_run(served, "restore-wave/restore-wave", wave="lab", time_scale=0.002)
    icu = start_run(served, "restore-wave/restore-wave", wave="icu", time_scale=0.002)
    assert final_state(served, icu).is_completed()
    assert final_state(served, lab).is_completed()
    ledger = served.ledger()
    for name, state in ledger.states().items():
        assert state is HostState.ONLINE
        events = [t.event for t in ledger.history(name).transitions]
        assert events.count("start_wipe") == 1, name
    engine = make_engine(served.ledger_url)
    with engine.connect() as db:
        claims = list(db.execute(select(PoolClaimRow.__table__)))
    engine.dispose()
    assert len(claims) == 13  # one reimage claim per workstation
    # Whenever a slot went to a claim, no claim of higher priority (smaller number) was waiting.
    inversions = [
        (granted.host, waiting.host)
        for granted in claims
        for waiting in claims
        if waiting.priority < granted.priority
        and waiting.requested_at < granted.granted_at < waiting.granted_at
    ]
    assert inversions == []
    waited = [c for c in claims if c.granted_at > c.requested_at + dt.timedelta(milliseconds=1)]
    assert waited, "the pool was never contended: the test proves nothing"


def test_killed_serve_process_resumes_without_repeating_a_wipe(served: Served) -> None:
    assert final_state(served, start_run(served, "restore-wave/restore-wave", wave="core")).is_completed()
    run_id = start_run(served, "restore-wave/restore-wave", wave="icu", time_scale=0.005)
    ledger = served.ledger()

    def midway() -> bool:
        states = ledger.states()
        icu = [s for n, s in states.items() if n.startswith(("gw", "ws-icu"))]
        return any(s is HostState.ONLINE for s in icu) and any(s is not HostState.ONLINE for s in icu)

    eventually(midway, timeout=120, interval=0.05)
    served.kill()  # the serve process and the flow run's process, SIGKILL: no clean-up at all
    with api_client(served.server) as client:
        client.set_flow_run_state(run_id, Scheduled(message="resumed after a crash"), force=True)
    served.start()
    state = final_state(served, run_id, timeout=240)
    assert state.is_completed(), state.message
    icu = [n for n in ledger.states() if n.startswith(("gw", "ws-icu"))]
    assert len(icu) == 9
    runs = set()
    for name in icu:
        history = ledger.history(name)
        assert history.host.state is HostState.ONLINE, name
        runs |= {t.run_id for t in history.transitions if t.run_id}
    # Wiped once, or again only after a wipe the crash interrupted and the fleet could not vouch for;
    # every log replays; nothing is left held.
    engine = make_engine(served.ledger_url)
    found = audit(engine, quiet=True)
    engine.dispose()
    assert found.ok, found.problems
    assert len(runs) == 1  # the re-run continued the same ledger run, with its approval and leases


def test_a_campaign_runs_the_approved_waves_while_the_others_wait(served: Served) -> None:
    run_id = start_run(served, "restore-estate/restore-estate", ask_approval=True)
    ledger = served.ledger()
    with api_client(served.server) as client:
        paused = eventually(lambda: (r := client.read_flow_run(run_id)).state and r.state.is_paused(), 120)
        assert paused
        answer = answer_form(
            client,
            run_id,
            {"approver": "Dr. Ada Osei", "waves": ["core", "icu"], "confirm_waves": "icu, core"},
        )
        assert answer.status.value == "ACCEPT"

        def icu_back() -> bool:
            states = ledger.states()
            return all(states[n] is HostState.ONLINE for n in states if n.startswith(("gw", "ws-icu", "dc")))

        eventually(icu_back, timeout=120)
        # The lab wave was not approved: none of its hosts was touched, and the run asks again.
        assert all(
            [t.event for t in ledger.history(f"ws-lab-0{n}").transitions] == ["enroll"] for n in range(1, 7)
        )
        again = eventually(lambda: (r := client.read_flow_run(run_id)).state and r.state.is_paused(), 60)
        assert again
        answer = answer_form(
            client, run_id, {"approver": "Dr. B. Mensah", "waves": ["lab"], "confirm_waves": "lab"}
        )
        assert answer.status.value == "ACCEPT"
    state = final_state(served, run_id)
    assert state.is_completed(), state.message
    assert set(ledger.states().values()) == {HostState.ONLINE}
    assert [(a.scope, a.approver) for a in ledger.history("ws-icu-01").approvals] == [("icu", "Dr. Ada Osei")]
    assert [(a.scope, a.approver) for a in ledger.history("ws-lab-01").approvals] == [
        ("lab", "Dr. B. Mensah")
    ]


def _logs(served: Served, run_id: UUID) -> list[str]:
    with api_client(served.server) as client:
        return [
            log.message
            for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        ]


def test_refusals_end_cleanly_with_our_words_and_no_traceback(served: Served) -> None:
    # The server checks the wave against the deployment's dropdown and says which exist.
    with pytest.raises(
        PrefectHTTPStatusError, match=r"'nope' is not one of \['core', 'icu', 'lab', 'rest'\]"
    ):
        start_run(served, "restore-wave/restore-wave", wave="nope")
    # Sites and hosts are free text: the flow refuses what the inventory does not have.
    unknown = start_run(served, "restore-wave/restore-wave", wave="icu", sites=["arll"])
    state = final_state(served, unknown)
    assert state.is_failed()
    assert state.message == "no site named 'arll' (sites: arl)"
    stranger = start_run(served, "restore-wave/restore-wave", wave="icu", hosts=["ws-lab-01"])
    state = final_state(served, stranger)
    assert state.is_failed()
    assert state.message == "not in the chosen waves: ws-lab-01"

    wrong = start_run(served, "restore-wave/restore-wave", wave="core", ask_approval=True)
    with api_client(served.server) as client:
        assert eventually(lambda: (r := client.read_flow_run(wrong)).state and r.state.is_paused(), 120)
        answer = answer_form(client, wrong, {"approver": "Dr. Ada Osei", "confirm_wave": "icu"})
        assert answer.status.value == "ACCEPT"  # the form is valid; the names typed do not match
    state = final_state(served, wrong)
    assert state.is_failed()
    assert (state.message or "").startswith("approval refused: the wave names were typed as 'icu'")
    assert [t.event for t in served.ledger().history("dc-01").transitions] == ["enroll"]

    assert final_state(served, start_run(served, "restore-wave/restore-wave", wave="core")).is_completed()
    again = start_run(served, "restore-wave/restore-wave", wave="core", ask_approval=True)
    state = final_state(served, again)
    assert state.is_completed()
    assert state.message == "wave core: nothing to do, all 1 host(s) were online already"
    with api_client(served.server) as client:
        history = client.read_flow_run_states(again)
    assert not any(s.is_paused() for s in history)  # nothing to wipe: nobody is asked

    def ended(run_id: UUID) -> list[str]:
        found = _logs(served, run_id)
        return found if any("ended Failed" in m for m in found) else []

    for run_id in (unknown, stranger, wrong):
        # The engine's own line stays (the run did end Failed), in our words and without a traceback.
        logs = eventually(functools.partial(ended, run_id), 30)
        assert not [m for m in logs if "Traceback" in m or "unexpected exception" in m], logs
    served.stop()
    terminal = served.log.read_text()
    assert "Traceback" not in terminal, terminal[-4000:]
    assert "unexpected exception" not in terminal
