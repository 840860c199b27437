"""Pool slots shared by every run through the ledger database, granted in clinical-priority order.

Prefect's concurrency limits have no priority and hand slots over slowly; here each run's scheduler
proposes the stages it wants to start, and one transaction grants those that fit. A stage that did
not fit stays filed as a *waiting* claim, so that another run's grants keep its place: a free slot
goes to the best waiting claim first, whichever run or process filed it (the priority numbers come
from :mod:`restore_flows.scheduling.priority` and compare across runs).

Claims expire unless renewed (each run renews all of its claims with its heartbeat), so a crashed run
gives its slots back by itself. Released and expired claims are kept, marked, as the record of who got
which slot when.

Each grant decision is one transaction that locks the pools it touches first, in name order, then
writes the claims: ``SELECT ... FOR UPDATE`` of the pool rows on PostgreSQL (a claim row references
its pool, so inserting it first would take a share lock on the pool row that another transaction's
``FOR UPDATE`` then waits on, while it waits on ours); on SQLite every write transaction already holds
the database lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, func, insert, select, update

from restore_flows.ledger.db import READ_ONLY, retried
from restore_flows.ledger.liveness import dead_runs
from restore_flows.ledger.tables import PoolClaimRow, PoolRow

POOLS = cast(Table, PoolRow.__table__)
CLAIMS = cast(Table, PoolClaimRow.__table__)


@dataclass(frozen=True, slots=True)
class Request:
    """A stage that wants one slot of each of ``pools`` at once."""

    host: str
    stage: str
    pools: tuple[str, ...]
    priority: int
    """Smaller goes first."""


@dataclass(frozen=True, slots=True)
class Grants:
    granted: tuple[Request, ...]
    claims: Mapping[tuple[str, str], tuple[int, ...]]
    """(host, stage) of each granted request -> its claim ids, to release."""
    taken_by_others: Mapping[str, int]
    """Per pool: slots other runs hold, or are owed first by their better waiting claims."""


class Slots:
    def __init__(self, engine: Engine, clock: Callable[[], dt.datetime], stale_seconds: float = 30.0) -> None:
        self._engine = engine
        self._clock = clock
        self._stale = stale_seconds

    @retried
    def sync(self, capacities: Mapping[str, int]) -> None:
        with self._engine.begin() as db:
            existing = {r.name: r.capacity for r in db.execute(select(POOLS.c.name, POOLS.c.capacity))}
            new = [{"name": n, "capacity": c} for n, c in capacities.items() if n not in existing]
            if new:
                db.execute(insert(POOLS), new)
            for name, capacity in capacities.items():
                if name in existing and existing[name] != capacity:
                    db.execute(update(POOLS).where(POOLS.c.name == name).values(capacity=capacity))

    @retried
    def grant(self, run_id: str, requests: Sequence[Request], seconds: float) -> Grants:
        """Grant what fits, best first across every run; file the rest as waiting claims of ``run_id``."""
        pools = sorted({pool for request in requests for pool in request.pools})
        if not pools:
            return Grants(tuple(requests), {(r.host, r.stage): () for r in requests}, {})
        now = self._clock()
        expires = now + dt.timedelta(seconds=seconds)
        with self._engine.begin() as db:
            capacity = _lock(db, pools)
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.pool.in_(pools), CLAIMS.c.released_at.is_(None), CLAIMS.c.expires_at <= now)
                .values(released_at=CLAIMS.c.expires_at)
            )
            # A dead run's claims are given back at once, not when they would have expired.
            db.execute(
                update(CLAIMS)
                .where(
                    CLAIMS.c.pool.in_(pools),
                    CLAIMS.c.released_at.is_(None),
                    CLAIMS.c.run_id != run_id,
                    CLAIMS.c.run_id.in_(dead_runs(now, self._stale)),
                )
                .values(released_at=now)
            )
            open_claims = db.execute(
                select(
                    CLAIMS.c.id,
                    CLAIMS.c.pool,
                    CLAIMS.c.host,
                    CLAIMS.c.stage,
                    CLAIMS.c.run_id,
                    CLAIMS.c.priority,
                    CLAIMS.c.granted_at,
                ).where(CLAIMS.c.pool.in_(pools), CLAIMS.c.released_at.is_(None))
            ).all()
            free = dict(capacity)
            others_held: dict[str, int] = defaultdict(int)
            mine_waiting: dict[tuple[str, str], list[int]] = defaultdict(list)
            theirs: dict[tuple[str, str, str], tuple[int, list[str]]] = {}
            for row in open_claims:
                if row.granted_at is not None:
                    free[row.pool] -= 1
                    if row.run_id != run_id:
                        others_held[row.pool] += 1
                elif row.run_id == run_id:
                    mine_waiting[(row.host, row.stage)].append(row.id)
                else:
                    key = (row.run_id, row.host, row.stage)
                    theirs.setdefault(key, (row.priority, []))[1].append(row.pool)
            # Everyone's waiting stages and this run's proposals, best first; a waiting stage of another
            # run that would fit keeps its slots, so a proposal that ranks below it does not get them.
            queue: list[tuple[int, int, Request | None, Sequence[str]]] = [
                (request.priority, 0, request, request.pools) for request in requests
            ]
            queue += [(priority, 1, None, wanted) for priority, wanted in theirs.values()]
            queue.sort(key=lambda item: (item[0], item[1]))
            owed: dict[str, int] = defaultdict(int)
            granted: list[Request] = []
            claims: dict[tuple[str, str], tuple[int, ...]] = {}
            waiting: list[Request] = []
            for _, _, request, wanted in queue:
                fits = all(free[pool] > 0 for pool in wanted)
                if request is None:
                    if fits:
                        for pool in wanted:
                            free[pool] -= 1
                            owed[pool] += 1
                    continue
                if not fits:
                    waiting.append(request)
                    continue
                for pool in wanted:
                    free[pool] -= 1
                granted.append(request)
                claims[(request.host, request.stage)] = self._take(
                    db, run_id, request, mine_waiting.pop((request.host, request.stage), []), now, expires
                )
            for request in waiting:
                if (request.host, request.stage) not in mine_waiting:
                    db.execute(
                        insert(CLAIMS), [_row(run_id, request, pool, now, expires) for pool in request.pools]
                    )
        taken = {pool: others_held[pool] + owed[pool] for pool in pools}
        return Grants(tuple(granted), claims, taken)

    @staticmethod
    def _take(
        db: Connection,
        run_id: str,
        request: Request,
        waiting_ids: list[int],
        now: dt.datetime,
        expires: dt.datetime,
    ) -> tuple[int, ...]:
        if waiting_ids:
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.id.in_(waiting_ids))
                .values(granted_at=now, expires_at=expires, priority=request.priority)
            )
            return tuple(waiting_ids)
        ids = db.execute(
            insert(CLAIMS).returning(CLAIMS.c.id),
            [_row(run_id, request, pool, now, expires, granted=True) for pool in request.pools],
        ).scalars()
        return tuple(int(i) for i in ids)

    @retried
    def wait(self, run_id: str, requests: Sequence[Request], seconds: float) -> None:
        """File waiting claims for stages that cannot start yet, unless already filed."""
        if not requests:
            return
        now = self._clock()
        expires = now + dt.timedelta(seconds=seconds)
        with self._engine.begin() as db:
            _lock(db, sorted({pool for request in requests for pool in request.pools}))
            filed = {
                (row.host, row.stage)
                for row in db.execute(
                    select(CLAIMS.c.host, CLAIMS.c.stage).where(
                        CLAIMS.c.run_id == run_id, CLAIMS.c.released_at.is_(None)
                    )
                )
            }
            rows = [
                _row(run_id, request, pool, now, expires)
                for request in requests
                if (request.host, request.stage) not in filed
                for pool in request.pools
            ]
            if rows:
                db.execute(insert(CLAIMS), rows)

    @retried
    def withdraw(self, run_id: str, host: str, stage: str) -> None:
        """Take back a waiting claim the run no longer wants (the host was given up)."""
        with self._engine.begin() as db:
            db.execute(
                update(CLAIMS)
                .where(
                    CLAIMS.c.run_id == run_id,
                    CLAIMS.c.host == host,
                    CLAIMS.c.stage == stage,
                    CLAIMS.c.granted_at.is_(None),
                    CLAIMS.c.released_at.is_(None),
                )
                .values(released_at=self._clock())
            )

    @retried
    def release(self, claims: Iterable[int]) -> None:
        ids = list(claims)
        if not ids:
            return
        with self._engine.begin() as db:
            self.release_in(db, ids, self._clock())

    @staticmethod
    def release_in(db: Connection, claims: Iterable[int], now: dt.datetime) -> None:
        """Give claims back inside a transaction of the caller's (the event that ends the stage)."""
        ids = list(claims)
        if ids:
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.id.in_(ids), CLAIMS.c.released_at.is_(None))
                .values(released_at=now)
            )

    @retried
    def release_run(self, run_id: str) -> None:
        """Give back every claim of a run (it is over)."""
        with self._engine.begin() as db:
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.run_id == run_id, CLAIMS.c.released_at.is_(None))
                .values(released_at=self._clock())
            )

    @retried
    def renew(self, run_id: str, seconds: float) -> None:
        """Keep every open claim of a run (granted or waiting) from expiring."""
        with self._engine.begin() as db:
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.run_id == run_id, CLAIMS.c.released_at.is_(None))
                .values(expires_at=self._clock() + dt.timedelta(seconds=seconds))
            )

    @retried
    def taken_by_others(self, run_id: str) -> dict[str, int]:
        """Per pool: slots granted to other runs and not expired."""
        now = self._clock()
        with self._engine.execution_options(**READ_ONLY).connect() as db:
            rows = db.execute(
                select(CLAIMS.c.pool, func.count())
                .where(
                    CLAIMS.c.run_id != run_id,
                    CLAIMS.c.granted_at.is_not(None),
                    CLAIMS.c.released_at.is_(None),
                    CLAIMS.c.expires_at > now,
                    CLAIMS.c.run_id.not_in(dead_runs(now, self._stale)),
                )
                .group_by(CLAIMS.c.pool)
            ).all()
        return {str(row[0]): int(row[1]) for row in rows}

    @retried
    def usage(self) -> dict[str, tuple[int, int, int]]:
        """Pool -> (capacity, granted, waiting), ignoring expired claims."""
        now = self._clock()
        with self._engine.execution_options(**READ_ONLY).connect() as db:
            capacity = {r.name: r.capacity for r in db.execute(select(POOLS.c.name, POOLS.c.capacity))}
            counts: dict[str, list[int]] = {name: [0, 0] for name in capacity}
            for row in db.execute(
                select(CLAIMS.c.pool, CLAIMS.c.granted_at.is_not(None), func.count())
                .where(CLAIMS.c.expires_at > now, CLAIMS.c.released_at.is_(None))
                .group_by(CLAIMS.c.pool, CLAIMS.c.granted_at.is_not(None))
            ):
                counts[row[0]][0 if row[1] else 1] += int(row[2])
        return {name: (capacity[name], c[0], c[1]) for name, c in counts.items()}


def _lock(db: Connection, pools: Sequence[str]) -> dict[str, int]:
    """Lock the pool rows in name order and read their capacities. Unknown pools have capacity 0."""
    query = select(POOLS.c.name, POOLS.c.capacity).where(POOLS.c.name.in_(pools)).order_by(POOLS.c.name)
    if db.dialect.name != "sqlite":
        query = query.with_for_update()
    found = {str(row.name): int(row.capacity) for row in db.execute(query)}
    return {pool: found.get(pool, 0) for pool in pools}


def _row(
    run_id: str,
    request: Request,
    pool: str,
    now: dt.datetime,
    expires: dt.datetime,
    granted: bool = False,
) -> dict[str, Any]:
    return {
        "pool": pool,
        "host": request.host,
        "run_id": run_id,
        "stage": request.stage,
        "priority": request.priority,
        "requested_at": now,
        "granted_at": now if granted else None,
        "expires_at": expires,
        "released_at": None,
    }
