"""How soon the estate is back, against its lower bound: the campaign, SRM-style barrier waves, and the
restore as it ran before (waves one after another, 16 hosts in flight, every dependency before the wipe).

1. Forecasts (the scheduler on a virtual clock) on the sample estate and on generated estates ten times
   larger, per wave and for the whole estate, side by side with the lower bound, and the targets.
2. Honest forecast: a time-scaled rehearsal of core + icu through a real Prefect server, measured from
   the ledger's timestamps, against what the forecast said for it.
3. ETA accuracy: a time-scaled rehearsal with +-30 % seeded noise on every stage and 2 % failures; the
   ETA made when a wave is 25 % and 50 % online, against when it really finished.

    .venv/bin/python benchmarks/schedule.py [--inventory inventory] [--skip-rehearsals]
        [--honest-scale 0.005] [--eta-scale 0.002]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, run_campaign
from restore_flows.execution.eta import forecast_from_ledger
from restore_flows.inventory.estate import Estate
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.scheduling.forecast import Forecast, WhatIf, forecast
from restore_flows.scheduling.priority import PriorityPolicy
from restore_flows.scheduling.runner import Retries
from restore_flows.states import HostState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estates import copies, pooled

TODAY = WhatIf(
    policy="barrier", max_hosts=16, priority=PriorityPolicy.PLAN, gate_everything_before=Stage.WIPE
)
# 'before': waves one after another, 16 hosts in flight, every dependency gating the wipe, plan order.
# 'SRM barrier': waves one after another, each as many at once as the pools allow, in plan order.
# 'barrier+prio': the same barriers with the campaign's look-ahead priority (what the barrier alone costs).
POLICIES: dict[str, WhatIf] = {
    "before": TODAY,
    "SRM barrier": WhatIf(policy="barrier"),
    "barrier+prio": WhatIf(policy="barrier", priority=PriorityPolicy.LOOKAHEAD),
    "campaign": WhatIf(),
}
TARGET_WAVES = {"icu": 1.15, "lab": 1.30, "radiology": 1.30}


def hours(minutes: float | None) -> str:
    return "   never" if minutes is None else f"{minutes / 60:7.1f}h"


@dataclass
class Check:
    name: str
    value: float
    target: str
    ok: bool


def compare(title: str, the_plan: Plan, checks: bool = True) -> list[Check]:
    results: dict[str, Forecast] = {}
    seconds: dict[str, float] = {}
    for name, what_if in POLICIES.items():
        started = time.perf_counter()
        results[name] = forecast(the_plan, what_if=what_if)
        seconds[name] = time.perf_counter() - started
    campaign = results["campaign"]
    took = seconds["campaign"]
    print(f"\n== {title}: {len(the_plan.hosts):,} hosts, forecast of the campaign in {took:.2f} s")
    header = (
        f"{'wave':<11}{'hosts':>7}{'bound':>9}" + "".join(f"{n:>14}" for n in POLICIES) + "   campaign/bound"
    )
    print(header)
    rows = [(w.name, w.hosts) for w in campaign.waves.values()]
    for name, count in rows:
        bound_minutes = campaign.waves[name].bound.minutes
        cells = "".join(f"{hours(results[p].waves[name].finish_minutes):>14}" for p in POLICIES)
        finish = campaign.waves[name].finish_minutes
        ratio = f"{finish / bound_minutes:.2f}" if finish and bound_minutes else "-"
        print(f"{name:<11}{count:>7}{hours(bound_minutes):>9}{cells}   {ratio:>8}")
    cells = "".join(f"{hours(results[p].makespan_minutes):>14}" for p in POLICIES)
    total = campaign.makespan_minutes or 0.0
    bound_total = campaign.bound.minutes or 1.0
    print(
        f"{'estate':<11}{len(the_plan.hosts):>7}{hours(bound_total):>9}{cells}   {total / bound_total:>8.2f}"
    )
    print(f"(estate bound: {campaign.bound.because})")
    if not checks:
        return []
    barrier = results["SRM barrier"].makespan_minutes or 1.0
    before = results["before"].makespan_minutes or 1.0
    found = [
        Check(f"{title}: estate / bound", total / bound_total, "<= 1.15", total / bound_total <= 1.15),
        Check(f"{title}: campaign / SRM barrier", total / barrier, "<= 0.70", total / barrier <= 0.70),
        Check(f"{title}: before / campaign", before / total, ">= 4", before / total >= 4),
        Check(f"{title}: forecast seconds", seconds["campaign"], "< 10", seconds["campaign"] < 10),
    ]
    for name, limit in TARGET_WAVES.items():
        wave = campaign.waves[name]
        value = (wave.finish_minutes or float("inf")) / (wave.bound.minutes or 1.0)
        found.append(Check(f"{title}: {name} / its bound", value, f"<= {limit:.2f}", value <= limit))
    return found


def _ledger(path: Path, the_plan: Plan) -> Ledger:
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    return ledger


def _makespan_minutes(ledger: Ledger, hosts: list[str], scale: float) -> float:
    first = min(a.started_at for n in hosts for a in ledger.history(n).attempts)
    last = max(t.at for n in hosts for t in ledger.history(n).transitions if t.event == "release_done")
    return (last - first).total_seconds() / 60 / scale


def honest(inventory: Path, the_plan: Plan, scale: float, scratch: Path) -> Check:
    """core + icu through the restore-estate flow on a real Prefect server, time-scaled."""
    from restore_flows.flows.server import client_settings, running_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    predicted = forecast(the_plan, what_if=WhatIf(waves=("core", "icu"))).makespan_minutes or 0.0
    data = scratch / "data"
    with running_server(scratch / "prefect", port=port) as server:
        os.environ.update(client_settings(server.api_url, server.home))
        os.environ["RESTORE_INVENTORY"] = str(inventory)
        os.environ["RESTORE_DATA_DIR"] = str(data)
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
        from restore_flows.flows.restore import EstateParameters, restore_estate

        started = time.perf_counter()
        state = restore_estate(EstateParameters(waves=["core", "icu"], time_scale=scale), return_state=True)
        wall = time.perf_counter() - started
        assert state.is_completed(), state.message
    engine = make_engine(f"sqlite:///{data / 'rehearsal.sqlite3'}")
    ledger = Ledger(engine)
    hosts = [n for w in ("core", "icu") for n in the_plan.wave(w).hosts]
    measured = _makespan_minutes(ledger, hosts, scale)
    engine.dispose()
    error = abs(measured - predicted) / predicted
    print(
        f"\n== honest forecast: core + icu through Prefect at time scale {scale} ({wall:.0f} s of wall time)"
        "\n"
        f"forecast {predicted / 60:.2f} h, rehearsal measured from the ledger {measured / 60:.2f} h: "
        f"{100 * error:.1f} % apart"
    )
    return Check("honest forecast: |rehearsal - forecast| / forecast", error, "<= 0.05", error <= 0.05)


class EtaProbe:
    """Watches a running rehearsal's ledger; when a wave reaches 25 % and 50 % online, asks the ETA."""

    def __init__(self, ledger: Ledger, the_plan: Plan, waves: list[str], pace: float) -> None:
        self._ledger = ledger
        self._plan = the_plan
        self._waves = waves
        self._pace = pace
        self.made: dict[tuple[str, int], dt.datetime] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> EtaProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        members = {w: set(self._plan.wave(w).hosts) for w in self._waves}
        while not self._stop.wait(0.25):
            states = self._ledger.states()
            due = [
                (wave, mark)
                for wave in self._waves
                for mark in (25, 50)
                if (wave, mark) not in self.made
                and 100 * sum(states[n] is HostState.ONLINE for n in members[wave]) / len(members[wave])
                >= mark
            ]
            if not due:
                continue
            now = dt.datetime.now(dt.UTC)
            found = forecast_from_ledger(self._ledger, self._plan, default_pace=self._pace)
            for wave, mark in due:
                finish = found.waves[wave].finish_minutes
                if finish is not None:
                    self.made[(wave, mark)] = now + dt.timedelta(minutes=finish)


def eta_accuracy(the_plan: Plan, scale: float, scratch: Path) -> list[Check]:
    ledger = _ledger(scratch / "eta.sqlite3", the_plan)
    fleet = SimulatedFleet(time_scale=scale, fail_rates=dict.fromkeys(Stage, 0.02), noise=0.3, seed=11)
    waves = list(TARGET_WAVES)
    settings = CampaignSettings(retries=Retries(backoff_minutes=(scale / 60, 5 * scale / 60)), pace=scale)
    started = dt.datetime.now(dt.UTC)
    with EtaProbe(ledger, the_plan, waves, scale) as probe:
        run_campaign(
            ledger,
            the_plan,
            fleet,
            Selection(),
            mode="rehearsal",
            actor="bench",
            approver=Automatic(),
            settings=settings,
        )
    print(f"\n== ETA accuracy: the whole estate at time scale {scale}, noise +-30 %, 2 % failures (seed 11)")
    checks = []
    for wave in waves:
        names = the_plan.wave(wave).hosts
        finished = [t.at for n in names for t in ledger.history(n).transitions if t.event == "release_done"]
        states = ledger.states(names)
        if len(finished) < len(names) or any(s is not HostState.ONLINE for s in states.values()):
            print(f"{wave}: not every host came online (out of attempts): no ETA to compare")
            continue
        actual = max(finished)
        for mark in (25, 50):
            made = probe.made.get((wave, mark))
            if made is None:
                continue
            error = abs((made - actual).total_seconds()) / (actual - started).total_seconds()
            eta = (made - started).total_seconds()
            real = (actual - started).total_seconds()
            print(
                f"{wave:<10} at {mark:>2} % online: ETA {eta:7.1f} s after the start, "
                f"finished at {real:7.1f} s: {100 * error:.1f} % off"
            )
            checks.append(Check(f"ETA at {mark} %: {wave}", error, "<= 0.10", error <= 0.10))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inventory", type=Path, default=Path("inventory"))
    parser.add_argument(
        "--honest-scale",
        type=float,
        default=0.005,
        help="time scale of the Prefect rehearsal (0.005: a planned minute lasts 0.3 s)",
    )
    parser.add_argument("--eta-scale", type=float, default=0.002, help="time scale of the ETA rehearsal")
    parser.add_argument("--skip-rehearsals", action="store_true", help="forecasts only")
    args = parser.parse_args()
    estate: Estate = load_estate(args.inventory)
    sample = plan(estate)
    checks = compare("sample estate", sample)
    checks += compare("10 x the sample (ten groups, each its own sites and pools)", plan(copies(estate, 10)))
    compare(
        "stress, not a target: 10 x the hosts sharing 10 x every pool", plan(pooled(estate, 10)), checks=False
    )
    if not args.skip_rehearsals:
        with tempfile.TemporaryDirectory(prefix="restore-schedule-bench-") as scratch:
            checks.append(honest(args.inventory.resolve(), sample, args.honest_scale, Path(scratch)))
            checks += eta_accuracy(sample, args.eta_scale, Path(scratch))
    print("\n== targets")
    for check in checks:
        print(f"{'ok  ' if check.ok else 'MISS'} {check.name}: {check.value:.3f} (target {check.target})")
    print(f"{sum(c.ok for c in checks)} of {len(checks)} targets met")


if __name__ == "__main__":
    main()
