"""A restore run in a process of its own, for the ledger's concurrency tests (not a test module).

    python tests/ledger/worker.py --url URL --hosts-file F --run-name N [options]

It starts a run, records an approval for every host in the file, then for each host (shuffled with a
seed, or in file order) takes the lease and, if the host is ``compromised``, sends the whole pipeline
(start_wipe ... release_done) and gives the lease back. A host whose lease another run holds is
skipped; a host found in another state is left alone. A host left mid-stage by a run that is gone is
resolved the only way a run may: ``start_wipe`` is tried and must be refused, then ``interrupted``.

Every line on stdout is one JSON object with an ``event`` key (``ready``, ``acquired``, ``skipped``,
``completed``, ``resolved``, ``stopped``), except the marker of ``--hold-transaction-after``:
``IN-TRANSACTION {json}``. Options for the tests:

``--clock-offset S``           the ledger's clock is real UTC now + S seconds (see expired leases
                               without sleeping);
``--wait-for-go``              print ``ready`` once set up, then wait for a line on stdin (start
                               several workers together);
``--acquire-first``            take every lease before working on any host;
``--stop-after-wipe HOST``     on HOST send only ``start_wipe``, keep the lease and go on;
``--hold-transaction-after K`` after K transitions, open a write transaction that records a bogus
                               ``wipe_done`` for the last host touched (UPDATE of the host row and
                               INSERT of a transition), print the marker and block on stdin for
                               ever; at end of stdin the transaction is rolled back, never committed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, insert, text, update

from restore_flows.errors import LeaseHeld
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.records import Lease
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.tables import HostRow, TransitionRow
from restore_flows.states import Event, HostState, IllegalTransition

PIPELINE: tuple[Event, ...] = (
    Event.START_WIPE,
    Event.WIPE_DONE,
    Event.START_REIMAGE,
    Event.REIMAGE_DONE,
    Event.START_VERIFY,
    Event.VERIFY_PASSED,
    Event.START_RELEASE,
    Event.RELEASE_DONE,
)

HOSTS = cast(Table, HostRow.__table__)
TRANSITIONS = cast(Table, TransitionRow.__table__)


def emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, sort_keys=True), flush=True)


def lease_json(lease: Lease) -> dict[str, Any]:
    return {
        "host": lease.host,
        "run_id": lease.run_id,
        "token": lease.token,
        "expires": lease.expires.isoformat(),
        "state": lease.state.value,
        "interrupted_stage": lease.interrupted_stage,
    }


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine: Engine = make_engine(args.url)
        offset = dt.timedelta(seconds=args.clock_offset)
        self.ledger = Ledger(self.engine, clock=lambda: dt.datetime.now(dt.UTC) + offset)
        self.actor = f"worker:{args.run_name}"
        self.applied = 0
        self.run_id = ""

    def apply(self, lease: Lease, event: Event, detail: str | None = None) -> None:
        self.ledger.apply(lease, event, actor=self.actor, detail=detail)
        self.applied += 1
        if self.args.hold_transaction_after is not None and self.applied >= self.args.hold_transaction_after:
            self.hold_transaction(lease.host)

    def hold_transaction(self, host: str) -> None:
        """Leave a half-written ``wipe_done`` open until the process is killed."""
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as db:
            db.execute(
                update(HOSTS).where(HOSTS.c.name == host).values(state=HostState.WIPED.value, updated_at=now)
            )
            db.execute(
                insert(TRANSITIONS).values(
                    host=host,
                    from_state=HostState.WIPING.value,
                    event=Event.WIPE_DONE.value,
                    to_state=HostState.WIPED.value,
                    run_id=self.run_id,
                    actor=self.actor,
                    at=now,
                    detail="half-written: this transaction is never committed",
                )
            )
            backend = None
            if db.dialect.name == "postgresql":
                backend = int(db.execute(text("SELECT pg_backend_pid()")).scalar_one())
            marker = {"host": host, "pid": os.getpid(), "backend_pid": backend, "applied": self.applied}
            print(f"IN-TRANSACTION {json.dumps(marker, sort_keys=True)}", flush=True)
            sys.stdin.read()  # blocks until killed; end of input means nobody is watching
            raise SystemExit("stdin closed while holding the transaction: rolled back")

    def take(self, host: str) -> Lease | None:
        try:
            lease = self.ledger.acquire(host, self.run_id, self.args.lease_seconds)
        except LeaseHeld as exc:
            emit({"event": "skipped", "host": host, "reason": "held", "detail": str(exc)})
            return None
        emit({"event": "acquired", **lease_json(lease)})
        return lease

    def work(self, lease: Lease) -> None:
        host = lease.host
        if lease.interrupted_stage is not None:
            self.resolve(lease)
            return
        if lease.state is not HostState.COMPROMISED:
            self.ledger.release(lease)
            emit({"event": "skipped", "host": host, "reason": f"state {lease.state.value}"})
            return
        if host == self.args.stop_after_wipe:
            self.apply(lease, Event.START_WIPE)
            emit({"event": "stopped", "host": host, "token": lease.token, "run_id": self.run_id})
            return
        for event in PIPELINE:
            self.apply(lease, event)
        self.ledger.release(lease)
        emit(
            {
                "event": "completed",
                "host": host,
                "run_id": self.run_id,
                "run_name": self.args.run_name,
                "token": lease.token,
                "pid": os.getpid(),
            }
        )

    def resolve(self, lease: Lease) -> None:
        """A stage left running by a dead run: it may not be started again, only marked interrupted."""
        refused = None
        try:
            self.apply(lease, Event.START_WIPE)
        except IllegalTransition as exc:
            refused = type(exc).__name__
        self.apply(lease, Event.INTERRUPTED, detail=f"{lease.interrupted_stage} left running by a dead run")
        state = self.ledger.host(lease.host).state
        self.ledger.release(lease)
        emit(
            {
                "event": "resolved",
                **lease_json(lease),
                "start_wipe_refused": refused,
                "now": state.value,
            }
        )

    def run(self) -> int:
        hosts = [line.strip() for line in Path(self.args.hosts_file).read_text().splitlines() if line.strip()]
        if self.args.order == "shuffled":
            random.Random(self.args.seed if self.args.seed is not None else self.args.run_name).shuffle(hosts)
        self.run_id = self.ledger.start_run("restore", "concurrency-test", self.actor, self.args.run_name)
        self.ledger.record_approval(
            self.run_id,
            "concurrency-test",
            hosts,
            approver="test approver",
            shown=f"{len(hosts)} hosts from {self.args.hosts_file}",
        )
        if self.args.wait_for_go:
            emit({"event": "ready", "run_id": self.run_id, "pid": os.getpid()})
            if not sys.stdin.readline():
                return 2
        if self.args.acquire_first:
            leases = [lease for lease in (self.take(h) for h in hosts) if lease is not None]
            for lease in leases:
                self.work(lease)
        else:
            for host in hosts:
                taken = self.take(host)
                if taken is not None:
                    self.work(taken)
        self.ledger.finish_run(self.run_id, "done")
        self.engine.dispose()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A restore run for the ledger concurrency tests.")
    parser.add_argument("--url", required=True)
    parser.add_argument("--hosts-file", required=True, help="One host name a line.")
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--lease-seconds", type=float, default=300.0)
    parser.add_argument("--clock-offset", type=float, default=0.0, help="Seconds added to the clock.")
    parser.add_argument("--order", choices=["shuffled", "given"], default="shuffled")
    parser.add_argument("--seed", help="Shuffle seed (default: the run name).")
    parser.add_argument("--wait-for-go", action="store_true")
    parser.add_argument("--acquire-first", action="store_true")
    parser.add_argument("--stop-after-wipe", metavar="HOST")
    parser.add_argument("--hold-transaction-after", type=int, metavar="K")
    return Worker(parser.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
