"""An audit of the ledger from its own records: what a crash, a kill or a lost connection must never
leave behind. Reads only, with plain queries of the tables, so that it checks the repository rather
than trusting it (``restore db audit``; the chaos benchmark runs it after every series of kills).

* every host's transition log replays through the state table from its enrolment to its recorded
  state (no event lost, none recorded twice, none illegal);
* a host was wiped again only after an interrupted wipe (a crash the fleet could not vouch for), and
  never after it was verified clean without an operator's ``recompromise``;
* when no run is alive: no lease held, no pool claim open, no stage attempt left running;
* every attempt that ended has the outcome of the event that ended it.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import Engine, Table, func, select

from restore_flows.ledger.liveness import dead_runs
from restore_flows.ledger.tables import AttemptRow, HostRow, PoolClaimRow, RunRow, TransitionRow
from restore_flows.states import INITIAL, TRANSITIONS, Event, HostState

HOSTS = cast(Table, HostRow.__table__)
RUNS = cast(Table, RunRow.__table__)
LOG = cast(Table, TransitionRow.__table__)
ATTEMPTS = cast(Table, AttemptRow.__table__)
CLAIMS = cast(Table, PoolClaimRow.__table__)


@dataclass
class Audit:
    hosts: int = 0
    transitions: int = 0
    wipes: int = 0
    resumed_wipes: int = 0
    """Wipes started again after an interrupted one (allowed: a half-wiped disk is wiped again)."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def audit(engine: Engine, *, quiet: bool | None = None, stale_seconds: float = 30.0) -> Audit:
    """Check the ledger. ``quiet``: whether no run may be alive (leases, claims and attempts must then
    all be closed); by default, decided from the runs table."""
    found = Audit()
    now = dt.datetime.now(dt.UTC)
    with engine.connect() as db:
        alive = db.execute(
            select(func.count())
            .select_from(RUNS)
            .where(RUNS.c.ended_at.is_(None), RUNS.c.id.not_in(dead_runs(now, stale_seconds)))
        ).scalar_one()
        still = (alive == 0) if quiet is None else quiet
        states = {r.name: HostState(r.state) for r in db.execute(select(HOSTS.c.name, HOSTS.c.state))}
        found.hosts = len(states)
        logs: dict[str, list[tuple[str | None, str, str, str | None]]] = defaultdict(list)
        for row in db.execute(
            select(LOG.c.host, LOG.c.from_state, LOG.c.event, LOG.c.to_state, LOG.c.detail).order_by(LOG.c.id)
        ):
            logs[row.host].append((row.from_state, row.event, row.to_state, row.detail))
            found.transitions += 1
        for host, state in states.items():
            _replay(host, state, logs.get(host, []), found)
        if still:
            leased = db.execute(select(HOSTS.c.name).where(HOSTS.c.lease_run.is_not(None))).scalars().all()
            open_claims = db.execute(
                select(func.count()).select_from(CLAIMS).where(CLAIMS.c.released_at.is_(None))
            )
            running = db.execute(select(ATTEMPTS.c.host).where(ATTEMPTS.c.ended_at.is_(None))).scalars().all()
            if leased:
                found.problems.append(
                    f"{len(leased)} lease(s) held with no run alive: {', '.join(leased[:5])}"
                )
            claims = open_claims.scalar_one()
            if claims:
                found.problems.append(f"{claims} pool claim(s) left open with no run alive")
            stuck = [h for h in running if states.get(h) not in _RUNNING_STATES]
            if stuck:
                found.problems.append(f"attempts left running on hosts not mid-stage: {', '.join(stuck[:5])}")
    return found


_RUNNING_STATES = frozenset(
    {
        HostState.CAPTURING_EVIDENCE,
        HostState.WIPING,
        HostState.REIMAGING,
        HostState.RESTORING,
        HostState.VERIFYING,
        HostState.RELEASING,
    }
)


def _replay(
    host: str, recorded: HostState, log: list[tuple[str | None, str, str, str | None]], found: Audit
) -> None:
    if not log or log[0][1] != Event.ENROLL.value or log[0][2] != INITIAL.value:
        found.problems.append(f"{host}: the log does not start with its enrolment")
        return
    state = INITIAL
    clean = False
    wiped = False
    """A wipe finished and no operator has decided since that the host must go round again."""
    interrupted = False
    """The last wipe was interrupted by a crash: wiping again is resuming it."""
    for number, (source, event, target, _detail) in enumerate(log[1:], start=2):
        if source != state.value:
            found.problems.append(
                f"{host}: entry {number} ({event}) starts from {source}, the log was at {state.value}: "
                "an event lost or recorded twice"
            )
            return
        expected = TRANSITIONS.get((state, Event(event)))
        if expected is None or expected.value != target:
            found.problems.append(
                f"{host}: entry {number}: {event} from {state.value} to {target} is illegal"
            )
            return
        if event == Event.START_WIPE.value:
            found.wipes += 1
            if clean:
                found.problems.append(f"{host}: wiped again after it was verified clean")
            if wiped:
                found.problems.append(
                    f"{host}: wiped again after a finished wipe, with no operator's decision"
                )
            if interrupted:
                found.resumed_wipes += 1
            interrupted = False
        elif event == Event.WIPE_DONE.value:
            wiped = True
        elif event == Event.INTERRUPTED.value and state is HostState.WIPING:
            interrupted = True
        elif event in (Event.RECOMPROMISE.value, Event.RELEASE_HOLD.value):
            wiped = clean = False
        if target == HostState.VERIFIED_CLEAN.value:
            clean = True
        state = HostState(target)
    if state is not recorded:
        found.problems.append(f"{host}: the log ends at {state.value}, the host is recorded {recorded.value}")
