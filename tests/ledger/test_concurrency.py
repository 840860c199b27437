"""Leases and fencing under real concurrency: several OS processes, a SIGKILL mid-transaction.

The process tests start ``worker.py`` (beside this file) with ``sys.executable``; every one of them is
bounded by a timeout. Nothing waits a fixed time: a test reads the workers' output up to a line it
expects, and on PostgreSQL waits for the killed session's row lock with a bounded ``lock_timeout``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, event, text
from sqlalchemy import select as sql_select

from restore_flows.errors import LeaseLost
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.records import Lease
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.tables import AttemptRow, HostRow, TransitionRow
from restore_flows.states import Event, HostState

WORKER = Path(__file__).resolve().with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]
PIPELINE = [
    "start_wipe",
    "wipe_done",
    "start_reimage",
    "reimage_done",
    "start_verify",
    "verify_passed",
    "start_release",
    "release_done",
]
ESTATE_SIZE = 1700
RACE_HOSTS = 200
RACE_WORKERS = 6
LEASE_SECONDS = 300.0
STARTUP_TIMEOUT = 60.0
RUN_TIMEOUT = 180.0

HOSTS = cast(Table, HostRow.__table__)
TRANSITIONS = cast(Table, TransitionRow.__table__)
ATTEMPTS = cast(Table, AttemptRow.__table__)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    stderr_path: Path
    buffer: bytes = b""

    def read_until(self, prefix: str, timeout: float) -> list[str]:
        """Lines of stdout up to and including the first one starting with ``prefix``; bounded."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                line = raw.decode()
                lines.append(line)
                if line.startswith(prefix):
                    return lines
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line starting with {prefix!r} within {timeout} s: {lines}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(
                        f"worker ended before {prefix!r} (exit {self.popen.wait(timeout=10)}): "
                        f"{lines}\n{self.stderr()}"
                    )
                self.buffer += chunk

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self, stdin: bytes, timeout: float) -> tuple[int, list[str], str]:
        """Send ``stdin``, wait for the end (bounded) and return exit code, stdout lines, stderr."""
        try:
            out, _ = self.popen.communicate(input=stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate(timeout=10)
            raise
        text_out = (self.buffer + out).decode()
        return self.popen.returncode, [line for line in text_out.splitlines() if line], self.stderr()


def start_worker(tmp_path: Path, url: str, hosts: list[str], run_name: str, *options: str) -> Proc:
    hosts_file = tmp_path / f"{run_name}.hosts"
    hosts_file.write_text("\n".join(hosts) + "\n")
    stderr_path = tmp_path / f"{run_name}.stderr"
    command = [
        sys.executable,
        str(WORKER),
        "--url",
        url,
        "--hosts-file",
        str(hosts_file),
        "--run-name",
        run_name,
        "--lease-seconds",
        str(LEASE_SECONDS),
        *options,
    ]
    with stderr_path.open("wb") as stderr:
        popen = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Proc(popen, stderr_path)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Workers a test started: none outlives it."""
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait(timeout=10)
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                stream.close()


def events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def free_hosts(ledger: Ledger, count: int) -> list[str]:
    """Hosts without forensic hold, so that a run may wipe them straight away."""
    names = [h.name for h in ledger.hosts() if not h.forensic_hold and h.state is HostState.COMPROMISED]
    assert len(names) >= count
    return names[:count]


def lease_from(payload: dict[str, Any]) -> Lease:
    return Lease(
        host=payload["host"],
        run_id=payload["run_id"],
        token=int(payload["token"]),
        expires=dt.datetime.fromisoformat(payload["expires"]),
        state=HostState(payload["state"]),
        interrupted_stage=payload["interrupted_stage"],
    )


def assert_log_agrees_with_states(engine: Engine) -> None:
    """Every host's state is the last transition's to_state, and the log is an unbroken chain."""
    with engine.connect() as db:
        states = {row.name: row.state for row in db.execute(sql_select(HOSTS.c.name, HOSTS.c.state))}
        chains: dict[str, list[Any]] = defaultdict(list)
        for row in db.execute(sql_select(TRANSITIONS).order_by(TRANSITIONS.c.id)):
            chains[row.host].append(row)
    assert set(chains) == set(states)
    for host, chain in chains.items():
        assert chain[0].from_state is None, host
        for before, after in itertools.pairwise(chain):
            assert after.from_state == before.to_state, (host, before.event, after.event)
        assert chain[-1].to_state == states[host], (host, chain[-1].event, states[host])


def wait_for_write_lock(url: str, host: str) -> None:
    """Return once a writer can lock ``host``'s row; fail (bounded) if the killed writer still holds it.

    SQLite: BEGIN IMMEDIATE with a short busy timeout. PostgreSQL: SELECT ... FOR UPDATE with a
    lock_timeout, which waits exactly until the server has aborted the dead session's transaction.
    """
    probe = make_engine(url, busy_timeout_ms=10_000, pool_size=1)
    try:
        with probe.begin() as db:
            if db.dialect.name == "postgresql":
                db.execute(text("SET LOCAL lock_timeout = '20s'"))
            db.execute(sql_select(HOSTS.c.name).where(HOSTS.c.name == host).with_for_update()).one()
    finally:
        probe.dispose()


@pytest.mark.slow
def test_race_every_host_restored_exactly_once(
    ledger: Ledger, engine: Engine, ledger_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    hosts = free_hosts(ledger, RACE_HOSTS)
    for number in range(RACE_WORKERS):
        procs.append(start_worker(tmp_path, ledger_url, hosts, f"race-{number}", "--wait-for-go"))
    run_of_worker: dict[str, str] = {}
    for number, proc in enumerate(procs):
        ready = events(proc.read_until('{"event": "ready"', STARTUP_TIMEOUT))[-1]
        run_of_worker[f"race-{number}"] = ready["run_id"]
    assert all(not proc.buffer for proc in procs)
    for proc in procs:  # all at once: every worker is blocked until its line arrives
        assert proc.popen.stdin is not None
        proc.popen.stdin.write(b"go\n")
        proc.popen.stdin.flush()

    completed: dict[str, set[str]] = {}
    for number, proc in enumerate(procs):
        code, lines, stderr = proc.finish(b"", RUN_TIMEOUT)
        assert code == 0, stderr
        assert "database is locked" not in stderr
        assert "Traceback" not in stderr, stderr
        done = [e for e in events(lines) if e["event"] == "completed"]
        assert all(e["run_id"] == run_of_worker[f"race-{number}"] for e in done)
        completed[f"race-{number}"] = {e["host"] for e in done}

    everyone = [h for hosts_done in completed.values() for h in hosts_done]
    assert len(everyone) == len(set(everyone)), "a host was reported by two workers"
    assert set(everyone) == set(hosts)
    assert sum(1 for done in completed.values() if done) >= 2, "no contention: one worker did it all"

    states = ledger.states(hosts)
    assert set(states.values()) == {HostState.ONLINE}
    run_of_host = {h: run_of_worker[w] for w, done in completed.items() for h in done}
    for host in hosts:
        history = ledger.history(host)
        assert [t.event for t in history.transitions] == ["enroll", *PIPELINE], host
        runs = {t.run_id for t in history.transitions[1:]}
        assert runs == {run_of_host[host]}, (host, runs)
        assert [(a.stage, a.number, a.outcome) for a in history.attempts] == [
            ("wipe", 1, "succeeded"),
            ("reimage", 1, "succeeded"),
            ("verify", 1, "succeeded"),
            ("release", 1, "succeeded"),
        ]
        assert history.host.lease_run is None
    assert ledger.transition_count() == ESTATE_SIZE + RACE_HOSTS * len(PIPELINE)
    assert_log_agrees_with_states(engine)


@pytest.mark.slow
def test_sigkill_mid_transaction_then_takeover(
    ledger: Ledger, engine: Engine, ledger_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    done_host, wiping_host, *untouched = free_hosts(ledger, 4)
    hosts = [done_host, wiping_host, *untouched]
    before = ledger.transition_count()

    # First run: takes all four leases, restores the first host (8 transitions), starts wiping the
    # second (9th), then opens a transaction writing a bogus wipe_done for it and is killed there.
    first = start_worker(
        tmp_path,
        ledger_url,
        hosts,
        "doomed",
        "--order=given",
        "--acquire-first",
        f"--stop-after-wipe={wiping_host}",
        f"--hold-transaction-after={len(PIPELINE) + 1}",
    )
    procs.append(first)
    lines = first.read_until("IN-TRANSACTION", STARTUP_TIMEOUT)
    marker = json.loads(lines[-1].removeprefix("IN-TRANSACTION "))
    assert marker["host"] == wiping_host
    old = {e["host"]: lease_from(e) for e in events(lines) if e["event"] == "acquired"}
    assert set(old) == set(hosts)
    os.kill(first.popen.pid, signal.SIGKILL)
    assert first.popen.wait(timeout=30) == -signal.SIGKILL
    assert "database is locked" not in first.stderr()

    # The dead writer's locks go with it (SQLite: the OS drops its file locks; PostgreSQL: the
    # server sees the socket close and aborts the transaction).
    wait_for_write_lock(ledger_url, wiping_host)
    if engine.dialect.name == "postgresql":
        with engine.connect() as db:
            left = db.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid AND state LIKE 'idle in%'"),
                {"pid": marker["backend_pid"]},
            ).scalar_one()
        assert left == 0
    else:
        with engine.connect() as db:
            assert db.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"

    # The half-written transaction left no trace.
    assert_log_agrees_with_states(engine)
    assert ledger.transition_count() == before + len(PIPELINE) + 1
    assert ledger.states(hosts) == {
        done_host: HostState.ONLINE,
        wiping_host: HostState.WIPING,
        **dict.fromkeys(untouched, HostState.COMPROMISED),
    }
    # The dead run still "holds" three leases until they expire: no one may resolve it before.
    assert ledger.interrupted() == []
    later = Ledger(engine, clock=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(seconds=LEASE_SECONDS + 60))
    assert later.interrupted() == [(wiping_host, "wipe")]

    # Second run, whose clock is past the dead run's leases, takes over.
    second = start_worker(
        tmp_path,
        ledger_url,
        [wiping_host, *untouched],
        "rescuer",
        "--order=given",
        f"--clock-offset={LEASE_SECONDS + 60}",
    )
    procs.append(second)
    code, out, stderr = second.finish(b"", RUN_TIMEOUT)
    assert code == 0, stderr
    assert "database is locked" not in stderr
    reports = events(out)
    resolved = [e for e in reports if e["event"] == "resolved"]
    assert len(resolved) == 1
    assert resolved[0]["host"] == wiping_host
    assert resolved[0]["interrupted_stage"] == "wipe"
    assert resolved[0]["start_wipe_refused"] == "IllegalTransition"
    assert resolved[0]["now"] == HostState.WIPE_FAILED.value
    assert resolved[0]["token"] > old[wiping_host].token
    assert {e["host"] for e in reports if e["event"] == "completed"} == set(untouched)

    assert later.interrupted() == []
    assert ledger.interrupted() == []
    history = ledger.history(wiping_host)
    assert [t.event for t in history.transitions].count("start_wipe") == 1
    assert [t.event for t in history.transitions] == ["enroll", "start_wipe", "interrupted"]
    assert history.transitions[1].run_id == old[wiping_host].run_id
    assert history.transitions[2].run_id == resolved[0]["run_id"]
    assert [(a.stage, a.number, a.outcome) for a in history.attempts] == [("wipe", 1, "interrupted")]
    assert ledger.states(hosts) == {
        done_host: HostState.ONLINE,
        wiping_host: HostState.WIPE_FAILED,
        **dict.fromkeys(untouched, HostState.ONLINE),
    }

    # The lost run comes back (its leases have not expired by its own clock): every write is refused.
    count = ledger.transition_count()
    for host, lease in old.items():
        assert lease.expires > dt.datetime.now(dt.UTC)
        with pytest.raises(LeaseLost):
            ledger.apply(lease, Event.WIPE_DONE, actor="worker:doomed")
        with pytest.raises(LeaseLost):
            ledger.renew(lease, LEASE_SECONDS)
        ledger.release(lease)  # harmless
        assert ledger.host(host).lease_run is None
    assert ledger.transition_count() == count
    assert_log_agrees_with_states(engine)


def test_fencing_token_refuses_the_lost_run(ledger: Ledger, engine: Engine) -> None:
    host = free_hosts(ledger, 1)[0]
    clock = FakeClock(dt.datetime.now(dt.UTC))
    paused = FakeClock(clock.now)  # the first run's own view of time: it was paused, it still believes
    first_ledger = Ledger(engine, clock=paused)
    second_ledger = Ledger(engine, clock=clock)
    first_run = first_ledger.start_run("restore", "fencing", "first")
    second_run = second_ledger.start_run("restore", "fencing", "second")
    for run in (first_run, second_run):
        first_ledger.record_approval(run, "fencing", [host], approver="test approver", shown="1 host")

    lease = first_ledger.acquire(host, first_run, 10)
    assert first_ledger.apply(lease, Event.START_WIPE, actor="first") is HostState.WIPING
    before = first_ledger.transition_count()

    clock.advance(10.5)  # past expiry by the shared clock; by its own, the first run is at t0 + 5
    paused.advance(5)
    assert second_ledger.interrupted() == [(host, "wipe")]
    taken = second_ledger.acquire(host, second_run, 10)
    assert taken.token > lease.token
    assert taken.interrupted_stage == "wipe"
    assert taken.state is HostState.WIPING

    with pytest.raises(LeaseLost):
        first_ledger.apply(lease, Event.WIPE_DONE, actor="first")
    with pytest.raises(LeaseLost):
        first_ledger.renew(lease, 10)
    with pytest.raises(LeaseLost):
        second_ledger.apply(lease, Event.WIPE_DONE, actor="first")  # by the true clock, too
    first_ledger.release(lease)  # harmless: the new holder keeps the lease
    record = second_ledger.host(host)
    assert record.lease_run == second_run
    assert record.state is HostState.WIPING
    assert first_ledger.transition_count() == before
    history = second_ledger.history(host)
    assert [t.event for t in history.transitions] == ["enroll", "start_wipe"]
    assert [(a.run_id, a.ended_at) for a in history.attempts] == [(first_run, None)]

    # The new holder resolves the interrupted stage; the old lease stays dead.
    assert second_ledger.apply(taken, Event.INTERRUPTED, actor="second") is HostState.WIPE_FAILED
    with pytest.raises(LeaseLost):
        first_ledger.apply(lease, Event.RETRY, actor="first")
    assert second_ledger.transition_count() == before + 1
    assert Counter(t.run_id for t in second_ledger.history(host).transitions) == Counter(
        {None: 1, first_run: 1, second_run: 1}
    )


@pytest.mark.slow
def test_readers_are_not_blocked_by_an_open_write_transaction(
    ledger: Ledger, engine: Engine, ledger_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """A status query must read the last committed state while another process is mid-write.

    Fails on SQLite (bug): ``make_engine`` issues ``BEGIN IMMEDIATE`` for every transaction, including
    the ones the ledger's read methods (``states``, ``history``, ``hosts``, ``interrupted``,
    ``transition_count``) open with ``engine.connect()``. A reader thus takes the write lock: it
    waits behind every writer and, when a writer holds its transaction longer than the busy timeout
    (a stalled or paused process), fails with 'database is locked', although WAL would let it read
    the last committed snapshot.
    """
    host = free_hosts(ledger, 1)[0]
    writer = start_worker(
        tmp_path, ledger_url, [host], "slow-writer", "--order=given", "--hold-transaction-after=1"
    )
    procs.append(writer)
    writer.read_until("IN-TRANSACTION", STARTUP_TIMEOUT)

    reader_engine = make_engine(ledger_url, busy_timeout_ms=2_000, pool_size=1)
    try:
        reader = Ledger(reader_engine)
        assert reader.states([host]) == {host: HostState.WIPING}
        assert [t.event for t in reader.history(host).transitions] == ["enroll", "start_wipe"]
        assert reader.transition_count() == ESTATE_SIZE + 1
        assert reader.interrupted() == []
    finally:
        reader_engine.dispose()
        os.kill(writer.popen.pid, signal.SIGKILL)
        writer.popen.wait(timeout=30)


class Interrupted(BaseException):
    """Stands for Ctrl-C, SystemExit or a cancelled task arriving in the middle of a ledger write."""


def test_an_interrupted_write_leaves_no_trace_and_does_not_block_the_next(
    ledger: Ledger, engine: Engine
) -> None:
    """A write interrupted by a BaseException is rolled back, and the process's next write proceeds.

    SQLAlchemy invalidates a connection when a BaseException (KeyboardInterrupt, SystemExit,
    asyncio.CancelledError, TimeoutError) interrupts a statement; whatever per-connection bookkeeping
    the engine keeps must survive that, or every later writer of the process waits for ever.
    """
    first, second = free_hosts(ledger, 2)
    run = ledger.start_run("restore", "interrupt", "test")
    ledger.record_approval(run, "interrupt", [first, second], approver="test approver", shown="2 hosts")
    lease = ledger.acquire(first, run, 60)
    before = ledger.transition_count()

    armed = True

    def interrupt(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if armed and statement.lstrip().upper().startswith("INSERT INTO TRANSITIONS"):
            raise Interrupted

    event.listen(engine, "before_cursor_execute", interrupt)
    try:
        with pytest.raises(BaseException) as caught:  # noqa: PT011 - which one is part of the finding
            ledger.apply(lease, Event.START_WIPE, actor="test")
    finally:
        armed = False
        event.remove(engine, "before_cursor_execute", interrupt)
    problems = []
    if not isinstance(caught.value, Interrupted):
        problems.append(f"the interruption was replaced by {caught.value!r}")
    assert ledger.transition_count() == before
    assert ledger.host(first).state is HostState.COMPROMISED

    outcome: list[HostState] = []

    def next_writer() -> None:
        other = ledger.acquire(second, run, 60)
        outcome.append(ledger.apply(other, Event.START_WIPE, actor="test"))

    thread = threading.Thread(target=next_writer, daemon=True)  # daemon: a hung one must not hang pytest
    thread.start()
    thread.join(timeout=15)
    if outcome != [HostState.WIPING]:
        problems.append("the next writer of this process is blocked: still waiting after 15 s")
    assert not problems
