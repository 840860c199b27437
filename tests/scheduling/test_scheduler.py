"""The scheduler's decisions as data: given what happened, which stage of which host starts now."""

from __future__ import annotations

from restore_flows.planning import Plan
from restore_flows.scheduling.priority import Priorities, PriorityPolicy
from restore_flows.scheduling.scheduler import BARRIER, CAMPAIGN, Policy, Scheduler, Status
from restore_flows.scheduling.work import jobs_for
from tests.scheduling.conftest import ESTATE, PlanOf


def _scheduler(
    the_plan: Plan,
    policy: Policy = CAMPAIGN,
    approved: set[int] | None = None,
    priority: PriorityPolicy = PriorityPolicy.LOOKAHEAD,
) -> Scheduler:
    every = [n for w in the_plan.waves for n in w.hosts]
    jobs, _ = jobs_for(the_plan, every)
    capacities = {name: pool.capacity for name, pool in the_plan.estate.pools.items()}
    return Scheduler(jobs, Priorities(the_plan, jobs, priority), capacities, approved=approved, policy=policy)


def _names(starts: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(s.host, s.stage.value) for s in starts]


def test_a_dependency_gates_only_the_stage_that_needs_it(plan_of: PlanOf) -> None:
    scheduler = _scheduler(plan_of(ESTATE))
    # At once: both DCs wipe (no pool), both workstations wipe; nothing waits for the DCs yet.
    assert sorted(_names(scheduler.decide(0))) == [
        ("dc-icu", "wipe"),
        ("dc-rad", "wipe"),
        ("ws-icu-01", "wipe"),
        ("ws-rad-01", "wipe"),
    ]
    for host in ("ws-icu-01", "ws-rad-01", "dc-icu", "dc-rad"):
        scheduler.finished(host)
    # The ICU workstation reimages before its DC is online: imaging needs nothing of the estate. One
    # slot per pool: the radiology ones wait for a slot, not for a dependency.
    assert _names(scheduler.decide(10)) == [("dc-icu", "restore"), ("ws-icu-01", "reimage")]
    assert scheduler.why("ws-rad-01") == "waiting for a slot in imaging (1 in use)"
    scheduler.finished("ws-icu-01")
    assert _names(scheduler.decide(35)) == [("ws-rad-01", "reimage")]
    assert scheduler.why("ws-icu-01") == "waiting for dc-icu to be online before verify"
    scheduler.finished("dc-icu")  # restored
    # Both start (the verify needs no pool): the order they are listed in is not a decision.
    assert sorted(_names(scheduler.decide(70))) == [("dc-icu", "verify"), ("dc-rad", "restore")]
    scheduler.finished("dc-icu")
    assert _names(scheduler.decide(80)) == [("dc-icu", "release")]
    scheduler.finished("dc-icu")
    assert scheduler.status["dc-icu"] is Status.DONE
    assert _names(scheduler.decide(82)) == [("ws-icu-01", "verify")]


def test_gating_before_wipe_holds_the_whole_pipeline(plan_of: PlanOf) -> None:
    gated = ESTATE.replace("depends_on: [dc-icu]", "depends_on: [dc-icu]\n    dependencies_before: wipe")
    scheduler = _scheduler(plan_of(gated))
    started = _names(scheduler.decide(0))
    assert ("ws-icu-01", "wipe") not in started
    assert ("ws-rad-01", "wipe") in started
    assert scheduler.why("ws-icu-01") == "waiting for dc-icu to be online before wipe"


def test_a_core_host_needed_by_icu_gets_the_slot_before_one_needed_by_radiology(plan_of: PlanOf) -> None:
    scheduler = _scheduler(plan_of(ESTATE))
    scheduler.decide(0)
    for host in ("dc-icu", "dc-rad", "ws-icu-01", "ws-rad-01"):
        scheduler.finished(host)
    starts = _names(scheduler.decide(20))
    # One backup slot: the DC the ICU needs restores first, whatever the names or the file order say.
    assert ("dc-icu", "restore") in starts
    assert ("dc-rad", "restore") not in starts
    assert scheduler.why("dc-rad") == "waiting for a slot in backup (1 in use)"
    # The plan's order alone (the old rule: core first, then by name) would have been the same here;
    # reversed names make the point: the rank comes from who needs the host.
    reversed_estate = ESTATE.replace("dc-icu", "dc-zzz").replace("dc-rad", "dc-aaa")
    other = _scheduler(plan_of(reversed_estate))
    other.decide(0)
    for host in ("dc-zzz", "dc-aaa", "ws-icu-01", "ws-rad-01"):
        other.finished(host)
    assert ("dc-zzz", "restore") in _names(other.decide(20))


def test_no_host_holds_a_slot_while_it_waits(plan_of: PlanOf) -> None:
    scheduler = _scheduler(plan_of(ESTATE))
    scheduler.decide(0)
    for host in ("dc-icu", "dc-rad", "ws-icu-01", "ws-rad-01"):
        scheduler.finished(host)
    assert ("ws-icu-01", "reimage") in _names(scheduler.decide(20))
    scheduler.finished("ws-icu-01")  # reimaged; now waits for its DC before verify...
    # ...and the one imaging slot goes straight to the radiology workstation.
    assert ("ws-rad-01", "reimage") in _names(scheduler.decide(45))
    assert scheduler.pool_use("imaging") == (1, 0)
    assert scheduler.status["ws-icu-01"] is Status.PENDING


def test_no_barrier_between_waves_but_the_barrier_policy_has_one(plan_of: PlanOf) -> None:
    campaign = _scheduler(plan_of(ESTATE))
    assert ("ws-rad-01", "wipe") in _names(campaign.decide(0))
    barrier = _scheduler(plan_of(ESTATE), policy=BARRIER, priority=PriorityPolicy.PLAN)
    assert _names(barrier.decide(0)) == [("dc-icu", "wipe"), ("dc-rad", "wipe")]
    assert barrier.why("ws-icu-01") == "waiting for the earlier waves to finish (barrier)"


def test_a_wave_not_yet_approved_does_not_start(plan_of: PlanOf) -> None:
    scheduler = _scheduler(plan_of(ESTATE), approved={0, 1})
    started = _names(scheduler.decide(0))
    assert ("ws-rad-01", "wipe") not in started
    assert ("ws-icu-01", "wipe") in started
    assert scheduler.why("ws-rad-01") == "waiting for the wave's approval"
    assert scheduler.waiting_for_approval() == {2}
    scheduler.approve(2)
    assert ("ws-rad-01", "wipe") in _names(scheduler.decide(1))


def test_a_failure_blocks_only_what_depends_on_it(plan_of: PlanOf) -> None:
    scheduler = _scheduler(plan_of(ESTATE))
    scheduler.decide(0)
    scheduler.failed("dc-icu", None, "wipe: BMC unreachable")
    for host in ("dc-rad", "ws-icu-01", "ws-rad-01"):
        scheduler.finished(host)
    scheduler.decide(20)
    # The ICU workstation still reimages (imaging needs nothing of its DC) and is blocked at verify.
    assert scheduler.status["ws-icu-01"] is Status.RUNNING
    scheduler.finished("ws-icu-01")
    after: Status = scheduler.status["ws-icu-01"]
    assert after is Status.BLOCKED
    assert scheduler.why("ws-icu-01") == "blocked: dc-icu wipe: BMC unreachable"
    assert scheduler.status["dc-rad"] is Status.RUNNING  # the other wave carries on


def test_a_retry_waits_for_its_back_off(plan_of: PlanOf) -> None:
    scheduler = _scheduler(plan_of(ESTATE))
    scheduler.decide(0)
    scheduler.failed("ws-icu-01", 5.0, "transient")
    assert ("ws-icu-01", "wipe") not in _names(scheduler.decide(4.9))
    assert scheduler.next_timer() == 5.0
    assert ("ws-icu-01", "wipe") in _names(scheduler.decide(5.0))


def test_a_slot_is_kept_for_a_better_stage_due_within_half_the_other(plan_of: PlanOf) -> None:
    # The ICU workstation's reimage waits for its DC; the radiology one could take the imaging slot.
    # Radiology has slack (a long verify elsewhere in its wave makes it due late), so the ICU reimage
    # is the better stage by its latest start.
    gated = ESTATE.replace("depends_on: [dc-icu]", "depends_on: [{host: dc-icu, before: reimage}]")
    gated = gated.replace(
        "hosts:\n",
        "  - {name: rad-srv, kind: server, services: [radiology], durations: {verify: 300}}\n"
        "hosts:\n  - {name: pacs-rad, role: rad-srv, site: arl}\n",
    )

    def scheduled(now: float) -> list[tuple[str, str]]:
        scheduler = _scheduler(plan_of(gated))
        scheduler.decide(0)
        for host in ("dc-icu", "dc-rad", "ws-icu-01"):
            scheduler.finished(host)
        scheduler.decide(10)  # dc-icu restores from 10: online at 10 + 60 + 10 + 2 = 82
        scheduler.finished("ws-rad-01")  # its wipe took long: its reimage is ready only now
        return _names(scheduler.decide(now))

    # At 60, the ICU stage is 22 minutes away, more than half the 25-minute reimage: no idling.
    assert ("ws-rad-01", "reimage") in scheduled(60)
    # At 70 it is 12 minutes away: the slot is kept, the radiology reimage waits.
    assert ("ws-rad-01", "reimage") not in scheduled(70)


# The lab waits for one restore and has slack (a long verify elsewhere in its wave); radiology has a
# long chain behind its restore (the RIS, then PACS). One backup slot.
SLACK = """
waves:
  - {name: core, services: [identity]}
  - {name: lab, services: [lab]}
  - {name: radiology, services: [radiology]}
sites:
  - {name: arl, kind: hospital}
pools:
  - {name: backup, capacity: 1}
roles:
  - {name: lab-vm, kind: server, services: [lab], restore_method: backup, pools: {restore: [backup]}}
  - {name: lab-analyser, kind: server, services: [lab], durations: {verify: 400}}
  - {name: ris, kind: server, services: [radiology], restore_method: backup, pools: {restore: [backup]}}
  - {name: pacs, kind: server, services: [radiology], depends_on: [ris-01], durations: {verify: 240}}
hosts:
  - {name: lab-01, role: lab-vm, site: arl}
  - {name: analyser-01, role: lab-analyser, site: arl}
  - {name: ris-01, role: ris, site: arl}
  - {name: pacs-01, role: pacs, site: arl}
"""


def test_a_long_chain_of_a_later_wave_goes_before_a_short_job_of_a_wave_with_slack(
    plan_of: PlanOf,
) -> None:
    def first_restore(priority: PriorityPolicy) -> list[tuple[str, str]]:
        scheduler = _scheduler(plan_of(SLACK), priority=priority)
        scheduler.decide(0)
        for host in ("lab-01", "ris-01"):
            scheduler.finished(host)  # wiped
        return [s for s in _names(scheduler.decide(10)) if s[1] == "restore"]

    # By latest start: the lab is due at its analyser's verify, hours away; radiology's restore has
    # four hours of PACS behind it. The lab loses nothing by waiting an hour.
    assert first_restore(PriorityPolicy.LOOKAHEAD) == [("ris-01", "restore")]
    # The plan's order (waves one after the other) would have restored the lab's VM first.
    assert first_restore(PriorityPolicy.PLAN) == [("lab-01", "restore")]
