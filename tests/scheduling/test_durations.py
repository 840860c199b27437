"""Durations: the plan, what was observed, and the seeded draws of rehearsals and forecasts."""

from __future__ import annotations

import statistics

from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import HostKind, RestoreMethod, Stage
from restore_flows.inventory.yamlsource import Location
from restore_flows.scheduling.durations import Durations, Observation, draw, pipeline, planned_minutes


def _host(name: str, role: str = "ws", kind: HostKind = HostKind.WORKSTATION, **extra: object) -> Host:
    return Host(
        name=name,
        kind=kind,
        site="s",
        role=role,
        department="d",
        services=("x",),
        depends_on=(),
        pools={},
        restore_method=RestoreMethod.REIMAGE,
        forensic_hold=False,
        location=Location("f", 1),
        **extra,  # type: ignore[arg-type]
    )


def test_the_plan_is_the_inventory_then_the_defaults() -> None:
    assert planned_minutes(_host("a"), Stage.REIMAGE) == 25
    assert planned_minutes(_host("b", kind=HostKind.SERVER), Stage.REIMAGE) == 40
    assert planned_minutes(_host("c", durations={Stage.REIMAGE: 7.5}), Stage.REIMAGE) == 7.5
    assert pipeline(_host("a")) == (Stage.WIPE, Stage.REIMAGE, Stage.VERIFY, Stage.RELEASE)


def test_observed_medians_per_role_and_the_pace_for_the_rest() -> None:
    hosts = {n: _host(n) for n in ("a", "b", "c")} | {"s": _host("s", role="srv", kind=HostKind.SERVER)}
    seen = [
        Observation("a", Stage.WIPE, 120),  # 2 minutes of a planned 10
        Observation("b", Stage.WIPE, 180),
        Observation("c", Stage.WIPE, 6000),  # one very slow one does not move a median much
        Observation("unknown-host", Stage.WIPE, 1),
    ]
    durations = Durations.learned(hosts, seen)
    assert durations.minutes(hosts["a"], Stage.WIPE) == 3.0
    # Nothing seen of servers or of reimages: the plan at the pace seen (median 0.3 of the plan).
    assert durations.pace == 0.3
    assert durations.minutes(hosts["s"], Stage.WIPE) == 20 * 0.3
    assert durations.minutes(hosts["a"], Stage.REIMAGE) == 25 * 0.3
    assert Durations.learned(hosts, [], default_pace=0.002).minutes(hosts["a"], Stage.WIPE) == 10 * 0.002


def test_seeded_draws_are_uniform_and_independent_from_one_attempt_to_the_next() -> None:
    # A failure drawn for one attempt says nothing about the next: retries are worth it.
    first = [draw(11, f"ws-{n:04d}", "release", 1, "fail") for n in range(4000)]
    second = [draw(11, f"ws-{n:04d}", "release", 2, "fail") for n in range(4000)]
    assert abs(statistics.mean(first) - 0.5) < 0.02
    assert abs(sum(x < 0.02 for x in first) / len(first) - 0.02) < 0.01
    assert abs(statistics.correlation(first, second)) < 0.05
    assert draw(11, "a", 1) == draw(11, "a", 1)
    assert draw(11, "a", 1) != draw(12, "a", 1)
