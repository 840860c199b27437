"""The ETA: remaining planned work of the busiest pool or of all workers, at the observed pace."""

from __future__ import annotations

import pytest

from restore_flows.eta import bound_minutes, eta_seconds, format_eta, observed_pace, planned_stages, wave_etas
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import HostKind, Pool, RestoreMethod, Stage
from restore_flows.inventory.yamlsource import Location

POOLS = {"imaging": Pool(name="imaging", capacity=2)}


def _ws(name: str, pooled: bool = True) -> Host:
    return Host(
        name=name,
        kind=HostKind.WORKSTATION,
        site="s",
        role="r",
        department="d",
        services=("x",),
        depends_on=(),
        pools={Stage.REIMAGE: ("imaging",)} if pooled else {},
        restore_method=RestoreMethod.REIMAGE,
        forensic_hold=False,
        location=Location("f", 1),
    )


def test_planned_stages_follow_method_and_hold() -> None:
    assert planned_stages(_ws("a")) == [Stage.WIPE, Stage.REIMAGE, Stage.VERIFY, Stage.RELEASE]


def test_bound_is_the_busiest_pool_or_the_workers() -> None:
    hosts = [_ws(f"w{i}") for i in range(8)]
    # Each workstation: wipe 10 + reimage 25 + verify 5 + release 1 = 41 planned minutes.
    assert bound_minutes(hosts, POOLS, workers=100) == pytest.approx(8 * 25 / 2)  # the imaging pool
    assert bound_minutes(hosts, POOLS, workers=2) == pytest.approx(8 * 41 / 2)  # the workers
    assert bound_minutes([_ws("u", pooled=False)], POOLS, workers=1) == pytest.approx(41)


def test_eta_scales_with_the_observed_pace() -> None:
    done = [_ws("d1"), _ws("d2")]
    remaining = [_ws(f"r{i}") for i in range(4)]
    assert eta_seconds([], remaining, POOLS, 100, 30.0) is None  # nothing to learn from yet
    # Two done in 50 s; their bound is 25 planned minutes (imaging) -> 2 s per planned minute.
    assert eta_seconds(done, remaining, POOLS, 100, 50.0) == pytest.approx(4 * 25 / 2 * 2.0)
    assert eta_seconds(done, [], POOLS, 100, 50.0) == 0.0


def test_pace_and_wave_etas_from_finished_attempts() -> None:
    hosts = {h.name: h for h in (_ws("a"), _ws("b"))}
    pace = observed_pace(hosts, [("a", "wipe", 20.0), ("a", "reimage", 50.0), ("ghost", "wipe", 999.0)])
    assert pace == pytest.approx(70.0 / 35.0)
    etas = wave_etas(hosts, POOLS, {"icu": ["b"], "lab": []}, pace, workers=16)
    assert etas == {"icu": pytest.approx(25 / 2 * 2.0), "lab": 0.0}  # the imaging pool bounds it
    assert wave_etas(hosts, POOLS, {"icu": ["b"]}, None, 16) == {"icu": None}


def test_format() -> None:
    assert format_eta(None) == "after the first hosts are done"
    assert format_eta(42) == "42 s"
    assert format_eta(600) == "10 min"
    assert format_eta(7200) == "2.0 h"
