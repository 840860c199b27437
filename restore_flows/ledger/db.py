"""Engines and migrations for the ledger database.

SQLite is the embedded default. It is made safe for several writer processes: WAL (readers never
block the writer), a busy timeout (writers queue instead of failing with "database is locked"), and
``BEGIN IMMEDIATE`` for every transaction, so a transaction takes the write lock when it starts.
Without that, two deferred transactions that both read and then write deadlock and one gets
SQLITE_BUSY at once, whatever the busy timeout.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from restore_flows.errors import LedgerError
from restore_flows.settings import Settings

log = logging.getLogger(__name__)


class SchemaError(LedgerError):
    """The ledger database is missing, unmigrated or at another revision than this code."""


def _alembic_dir() -> Path:
    """The migrations: inside the installed package (the wheel carries them as
    ``restore_flows/alembic``), else the checkout's top-level ``alembic/``, where they are kept."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "alembic", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError("the ledger's migrations are missing from this installation (alembic/env.py)")


ALEMBIC_DIR = _alembic_dir()


def make_engine(
    url: str, *, busy_timeout_ms: int = 30_000, pool_size: int = 10, max_overflow: int | None = None
) -> Engine:
    """``pool_size`` connections kept, and ``max_overflow`` (default: as many) more on a burst."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout_ms / 1000, "isolation_level": None},
        )
        _sqlite_setup(engine, busy_timeout_ms)
        return engine
    overflow = pool_size if max_overflow is None else max_overflow
    return create_engine(url, pool_size=pool_size, max_overflow=overflow, pool_pre_ping=True)


READ_ONLY = {"ledger_read_only": True}
"""Execution options for read-only work: on SQLite it begins a deferred transaction, which neither takes
the write lock nor waits for it (WAL readers see the last commit)."""


def _sqlite_setup(engine: Engine, busy_timeout_ms: int) -> None:
    # Threads of one process queue on this lock instead of on SQLite's busy handler, which sleeps
    # in steps of up to 100 ms between retries: with a dozen writer threads that turned a
    # millisecond of work into tens of milliseconds. Other processes still use the busy timeout.
    writer = threading.Lock()
    # Which thread holds it: a connection's own bookkeeping may be unreadable after an interrupted
    # write (SQLAlchemy invalidates the connection), and the lock must come back whatever happened.
    holder = threading.local()
    wait = busy_timeout_ms / 1000 if busy_timeout_ms > 0 else -1

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL: a commit survives a process crash; only an OS crash may lose the last ones.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get("ledger_read_only"):
            connection.exec_driver_sql("BEGIN")
            return
        if not writer.acquire(timeout=wait):
            raise TimeoutError(f"waited {wait:.0f} s for this process's ledger writer lock")
        holder.held = True
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release()
            raise

    def _release(*_args: Any) -> None:
        if getattr(holder, "held", False):
            holder.held = False
            writer.release()

    # 'commit' and 'rollback' fire just before the database's own; the next writer's BEGIN IMMEDIATE
    # then waits at most for that COMMIT, in SQLite's busy handler. The pool events cover a
    # connection invalidated or returned without either (an exception in the middle of a write).
    event.listen(engine, "commit", _release)
    event.listen(engine, "rollback", _release)
    event.listen(engine.pool, "reset", _release)
    event.listen(engine.pool, "invalidate", _release)
    event.listen(engine.pool, "checkin", _release)


def engine_from_settings(
    settings: Settings, rehearsal: bool = False, connections: int | None = None
) -> Engine:
    """``connections``: at most that many, shared by the process's threads (default: make_engine's)."""
    url, busy = settings.ledger_url(rehearsal), settings.sqlite_busy_timeout_ms
    if connections is None:
        return make_engine(url, busy_timeout_ms=busy)
    return make_engine(url, busy_timeout_ms=busy, pool_size=connections, max_overflow=0)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    # '%' is interpolation syntax in the config parser: a password with '%' must not break it.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def upgrade(engine: Engine, revision: str = "head") -> None:
    _migrate(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    _migrate(engine, command.downgrade, revision)


def _migrate(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    config = alembic_config(engine.url.render_as_string(hide_password=False))

    def migrate() -> None:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            step(config, revision)

    # A migration is one transaction: cut off (a terminated connection, a deadlock) it is rolled
    # back and may run again whole. Reaching an absolute target ('head', 'base', a revision id) a
    # second time after a commit whose answer was lost does nothing; a relative one ('+1', 'head-1')
    # would move again, so it is not retried.
    relative = "+" in revision or "-" in revision
    try:
        (migrate if relative else retried(migrate))()
    except CommandError as exc:  # an unknown revision, most often: say it in the project's words
        raise SchemaError(f"cannot migrate to {revision!r}: {exc}") from exc


def require_current_schema(engine: Engine) -> None:
    """Refuse to work on a database this code was not written for."""
    current = current_revision(engine)
    head = head_revision()
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise SchemaError(f"the ledger database at {where} is not set up: run 'restore db upgrade'")
    if current != head:
        raise SchemaError(
            f"the ledger database at {where} is at revision {current}, this code needs {head}: "
            "run 'restore db upgrade' (or use the matching version of restore-orchestrator)"
        )


# PostgreSQL SQLSTATEs worth another try: the transaction was rolled back for the database's own
# reasons (deadlock, serialization), or the connection went (admin shutdown, crash, network).
# 53300: every connection slot of the server is taken (many sites' sessions at once); one frees soon.
_TRANSIENT_SQLSTATES = frozenset(
    {"40001", "40P01", "53300", "57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006"}
)
_RETRY_FOR_SECONDS = 60.0
_POOL_WAIT_FOR_SECONDS = 600.0
"""Every connection of this process's pool busy is back-pressure, not an outage: a thousand stages in
flight in one process on a loaded machine waited past the database's minute (two waits of the pool's
30 s), and hosts failed for it. Not for ever: a connection never given back shows as these warnings,
then as a failure."""


def is_transient(exc: BaseException) -> bool:
    """Whether a database error may well not happen again: worth retrying the whole transaction."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = getattr(exc.orig, "sqlstate", None)
    if state in _TRANSIENT_SQLSTATES:
        return True
    if (
        type(exc.orig).__module__.startswith("psycopg")
        and isinstance(exc, OperationalError)
        and state is None
    ):
        # libpq lost the connection ("server closed the connection unexpectedly"): no SQLSTATE at all.
        return True
    text = str(exc.orig).lower()
    # SQLite: another process held the lock past the busy timeout.
    return "database is locked" in text or "database is busy" in text


P = ParamSpec("P")
R = TypeVar("R")


def retried(method: Callable[P, R]) -> Callable[P, R]:
    """Run a ledger method again, whole, when its transaction failed for a transient reason.

    Every method of the repository is one transaction, so running it again is running the
    transaction again; a deadlock, a serialization failure or a dropped connection is never a
    host's failure. Gives up (and raises) after a minute, or after ten when it is this process's
    own connections that stay busy.
    """

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.monotonic()
        delay = 0.02
        jitter = random.Random()
        while True:
            try:
                return method(*args, **kwargs)
            except (DBAPIError, PoolTimeout) as exc:
                # PoolTimeout: every connection of this process's pool was busy for the pool's whole
                # wait (1,700 hosts in flight on a loaded machine): nothing was sent, so waiting again
                # is safe, and it is no host's failure either.
                busy_pool = isinstance(exc, PoolTimeout)
                patience = _POOL_WAIT_FOR_SECONDS if busy_pool else _RETRY_FOR_SECONDS
                if not (busy_pool or is_transient(exc)) or time.monotonic() + delay > started + patience:
                    raise
                cause = exc.orig if isinstance(exc, DBAPIError) else exc
                log.warning("ledger: %s, retrying %s", cause.__class__.__name__, method.__name__)
                time.sleep(delay * (0.5 + jitter.random()))
                delay = min(delay * 2, 2.0)

    return wrapper


@retried
def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
