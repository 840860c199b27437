"""Properties of the planner on random valid dependency graphs (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from restore_flows.inventory.estate import Estate, Host
from restore_flows.inventory.models import CATCH_ALL, HostKind, RestoreMethod, Site, SiteKind, Wave
from restore_flows.inventory.yamlsource import Location
from restore_flows.planning import plan

SERVICES = ["s0", "s1", "s2", "s3", "s4", "s5"]


@st.composite
def estates(draw: st.DrawFn) -> Estate:
    wave_count = draw(st.integers(1, 4))
    # Each listed service goes to one wave; the last wave is the catch-all.
    assignment = draw(st.lists(st.integers(0, wave_count - 1), min_size=6, max_size=6))
    waves = []
    for index in range(wave_count):
        services = [s for s, w in zip(SERVICES, assignment, strict=True) if w == index]
        if index == wave_count - 1:
            services.append(CATCH_ALL)
        if services:
            waves.append(Wave(name=f"w{index}", services=services))
    count = draw(st.integers(1, 40))
    hosts: dict[str, Host] = {}
    for i in range(count):
        # Only edges to earlier-numbered hosts: the graph is acyclic by construction; names are
        # shuffled so that name order says nothing about dependency order.
        deps = draw(st.lists(st.integers(0, i - 1), max_size=4, unique=True)) if i else []
        name = f"h{(i * 7919) % 1000:03d}-{i}"
        hosts[name] = Host(
            name=name,
            kind=draw(st.sampled_from(HostKind)),
            site="s",
            role="r",
            department="d",
            services=tuple(draw(st.lists(st.sampled_from([*SERVICES, "other"]), max_size=3))),
            depends_on=tuple(list(hosts)[j] for j in deps),
            pools={},
            restore_method=RestoreMethod.REIMAGE,
            forensic_hold=False,
            location=Location("f", 1),
        )
    return Estate(
        waves=tuple(waves),
        sites={"s": Site(name="s", kind=SiteKind.HOSPITAL)},
        pools={},
        hosts=hosts,
    )


@settings(max_examples=200, deadline=None)
@given(estates())
def test_dependencies_never_come_later(estate: Estate) -> None:
    the_plan = plan(estate)
    order = {wave.name: i for i, wave in enumerate(the_plan.waves)}
    position = {name: (order[w.name], i) for w in the_plan.waves for i, name in enumerate(w.hosts)}
    assert sorted(position) == sorted(estate.hosts)  # every host planned exactly once
    assert sum(len(w.hosts) for w in the_plan.waves) == len(estate.hosts)
    for name, host in estate.hosts.items():
        for dependency in host.depends_on:
            # Same or earlier wave, and before the dependent inside its wave.
            assert position[dependency] < position[name]


@settings(max_examples=200, deadline=None)
@given(estates())
def test_wave_is_earliest_of_own_and_dependents(estate: Estate) -> None:
    the_plan = plan(estate)
    order = {wave.name: i for i, wave in enumerate(the_plan.waves)}
    dependents: dict[str, list[str]] = {name: [] for name in estate.hosts}
    for name, host in estate.hosts.items():
        for dependency in host.depends_on:
            dependents[dependency].append(name)
    for name, planned in the_plan.hosts.items():
        wave = order[planned.wave]
        expected = min([order[planned.own_wave]] + [order[the_plan.hosts[d].wave] for d in dependents[name]])
        assert wave == expected
        if planned.pulled_forward_by is None:
            assert planned.wave == planned.own_wave
        else:
            assert wave < order[planned.own_wave]
            assert planned.pulled_forward_by in dependents[name]
            assert the_plan.hosts[planned.pulled_forward_by].wave == planned.wave
            assert planned.pulled_forward_chain[0] == planned.pulled_forward_by
            root = the_plan.hosts[planned.pulled_forward_chain[-1]]
            assert root.own_wave == planned.wave
