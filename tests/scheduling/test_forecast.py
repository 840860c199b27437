"""The forecast: the scheduler on a virtual clock. Never below the lower bound; the same for a seed;
from a half-done estate it forecasts only what is left."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from restore_flows.inventory.estate import Estate, Host
from restore_flows.inventory.models import (
    CATCH_ALL,
    HostKind,
    Pool,
    RestoreMethod,
    Site,
    SiteKind,
    Stage,
    Wave,
)
from restore_flows.inventory.yamlsource import Location
from restore_flows.planning import plan
from restore_flows.scheduling.bounds import bound
from restore_flows.scheduling.forecast import WhatIf, forecast
from restore_flows.scheduling.work import jobs_for
from restore_flows.states import HostState
from tests.scheduling.conftest import ESTATE, PlanOf

GATES = [Stage.WIPE, Stage.REIMAGE, Stage.VERIFY, Stage.RELEASE]


@st.composite
def estates(draw: st.DrawFn) -> Estate:
    pool_count = draw(st.integers(1, 3))
    pools = {f"p{i}": Pool(name=f"p{i}", capacity=draw(st.integers(1, 3))) for i in range(pool_count)}
    waves = (
        Wave(name="core", services=["infra"]),
        Wave(name="icu", services=["icu"]),
        Wave(name="rest", services=[CATCH_ALL]),
    )
    hosts: dict[str, Host] = {}
    for i in range(draw(st.integers(1, 25))):
        name = f"h{i:02d}"
        deps = draw(st.lists(st.sampled_from(sorted(hosts)), max_size=3, unique=True)) if hosts else []
        method = draw(st.sampled_from(RestoreMethod))
        rebuild = Stage.RESTORE if method is RestoreMethod.BACKUP else Stage.REIMAGE
        stages = [Stage.WIPE, rebuild, Stage.VERIFY, Stage.RELEASE]
        hosts[name] = Host(
            name=name,
            kind=draw(st.sampled_from(HostKind)),
            site="s",
            role=draw(st.sampled_from(["a", "b", "c"])),
            department="d",
            services=(draw(st.sampled_from(["infra", "icu", "other"])),),
            depends_on=tuple(deps),
            pools={stage: (draw(st.sampled_from(sorted(pools))),) for stage in stages if draw(st.booleans())},
            restore_method=method,
            forensic_hold=draw(st.booleans()),
            location=Location("f", 1),
            durations={stage: float(draw(st.integers(0, 90))) for stage in stages if draw(st.booleans())},
            gates={dep: draw(st.sampled_from(GATES)) for dep in deps},
        )
    return Estate(waves=waves, sites={"s": Site(name="s", kind=SiteKind.HOSPITAL)}, pools=pools, hosts=hosts)


@settings(max_examples=150, deadline=None)
@given(estates(), st.sampled_from(["campaign", "barrier"]), st.floats(0, 0.5), st.integers(0, 3))
def test_no_forecast_is_below_its_bound(estate: Estate, policy: str, noise: float, seed: int) -> None:
    the_plan = plan(estate)
    found = forecast(the_plan, what_if=WhatIf(policy=policy, noise=noise, seed=seed))
    assert found.makespan_minutes is not None  # nothing fails in a forecast without failures
    assert found.bound.minutes is not None
    # The bound is computed with the plan's minutes; noise can make stages shorter, by up to 'noise'.
    assert found.makespan_minutes >= found.bound.minutes * (1 - noise) - 1e-6
    for wave in found.waves.values():
        assert wave.finish_minutes is not None
        assert wave.bound.minutes is not None
        assert wave.finish_minutes >= wave.bound.minutes * (1 - noise) - 1e-6
    if noise == 0:
        assert found.makespan_minutes >= found.bound.minutes - 1e-6


@settings(max_examples=40, deadline=None)
@given(estates(), st.integers(0, 5))
def test_the_same_seed_gives_the_same_forecast(estate: Estate, seed: int) -> None:
    the_plan = plan(estate)
    what_if = WhatIf(noise=0.3, fail_rate=0.1, seed=seed)
    first = forecast(the_plan, what_if=what_if)
    assert forecast(the_plan, what_if=what_if).to_json() == first.to_json()
    assert forecast(the_plan, what_if=what_if).finish == first.finish


def test_the_bound_is_the_chain_or_the_busiest_pool(plan_of: PlanOf) -> None:
    the_plan = plan_of(ESTATE)
    every = [n for w in the_plan.waves for n in w.hosts]
    jobs, _ = jobs_for(the_plan, every)
    capacities = {n: p.capacity for n, p in the_plan.estate.pools.items()}
    found = bound(jobs, every, capacities)
    # Chain: a DC wipes (20), restores (60), verifies (10), releases (2): 92; then a workstation
    # verifies (5) and is released (1): 98. The backup pool: 2 restores of 60 on one slot, the
    # earliest at 20, then 12 minutes after the last: 20 + 120 + 12 = 152.
    assert found.chain_minutes == 98
    assert found.pool_minutes is not None
    assert found.pool_minutes["backup"] == 152
    assert (found.minutes, found.because) == (152, "pool backup")
    icu = bound(jobs, every, capacities, hosts=["ws-icu-01"])
    assert (icu.minutes, icu.because) == (98, "the longest dependency chain")


def test_what_if_more_capacity_and_barrier_waves(plan_of: PlanOf) -> None:
    the_plan = plan_of(ESTATE)
    base = forecast(the_plan)
    # The backup pool's 152 minutes, then the radiology workstation's verify (5) and release (1).
    assert (base.makespan_minutes, base.bound.minutes) == (158, 152)
    assert base.makespan_minutes is not None
    wider = forecast(the_plan, what_if=WhatIf(capacity={"backup": 2}))
    assert wider.makespan_minutes is not None
    assert wider.makespan_minutes < base.makespan_minutes
    barrier = forecast(the_plan, what_if=WhatIf(policy="barrier"))
    assert barrier.makespan_minutes is not None
    assert barrier.makespan_minutes > base.makespan_minutes
    assert barrier.waves["icu"].finish_minutes is not None
    assert base.waves["icu"].finish_minutes is not None
    assert base.waves["icu"].finish_minutes <= barrier.waves["icu"].finish_minutes


def test_a_wave_alone_waits_for_nothing_outside_it(plan_of: PlanOf) -> None:
    the_plan = plan_of(ESTATE)
    icu = forecast(the_plan, what_if=WhatIf(waves=("icu",)))
    assert list(icu.waves) == ["icu"]
    # The planner pulled the ICU's DC into the core wave: without it the workstation cannot finish.
    assert icu.waves["icu"].finish_minutes is None
    assert icu.waves["icu"].unfinished == {"ws-icu-01": "blocked: dc-icu is not in the waves forecast"}
    both = forecast(the_plan, what_if=WhatIf(waves=("core", "icu")))
    assert both.waves["icu"].finish_minutes is not None


def test_a_forecast_from_a_half_done_estate(plan_of: PlanOf) -> None:
    the_plan = plan_of(ESTATE)
    fresh = forecast(the_plan)
    states = {
        "dc-icu": HostState.ONLINE,
        "ws-icu-01": HostState.REIMAGED,
        "dc-rad": HostState.RESTORING,
        "ws-rad-01": HostState.COMPROMISED,
    }
    # dc-rad has restored for 50 of its 60 minutes: 10 left, then verify 10 and release 2.
    half = forecast(the_plan, states=states, running={"dc-rad": 50.0})
    assert half.waves["core"].online == 1
    assert half.finish["ws-icu-01"] == 6  # verify 5 and release 1, its DC is online
    assert half.finish["dc-rad"] == 22
    assert half.makespan_minutes is not None
    assert fresh.makespan_minutes is not None
    assert half.makespan_minutes < fresh.makespan_minutes
    # A host that needs an operator never finishes; what depends on it is said to be blocked.
    stuck = forecast(the_plan, states={**states, "dc-rad": HostState.RESTORE_FAILED})
    assert stuck.waves["radiology"].finish_minutes is None
    assert stuck.unfinished["ws-rad-01"] == "blocked: dc-rad is restore_failed"
    assert stuck.waves["icu"].finish_minutes == 6


def test_unknown_policy_and_wave_are_refused(plan_of: PlanOf) -> None:
    the_plan = plan_of(ESTATE)
    with pytest.raises(ValueError, match="unknown policy 'srm'"):
        forecast(the_plan, what_if=WhatIf(policy="srm"))
    with pytest.raises(ValueError, match="no such wave: lab"):
        forecast(the_plan, what_if=WhatIf(waves=("lab",)))
