"""Which runs are alive: they heartbeat in the ledger while their process lives.

A run is dead when it ended, when it has not been heard from within the staleness limit (its
machine died, or lost the database), or, on this machine, when its process is gone (a ``kill -9``
is seen at once, not after the limit). A dead run's hosts and pool slots are taken over by the next
run that wants them; the fencing token of each lease refuses the dead run's late writes.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from typing import Any, cast

from sqlalchemy import Table, func, or_, select

from restore_flows.ledger.tables import RunRow

RUNS = cast(Table, RunRow.__table__)


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_here(process: str | None) -> bool:
    """The run's process was on this machine and is gone."""
    if not process:
        return False
    machine, _, pid = process.rpartition(":")
    if machine != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        return False
    return False


def dead_runs(now: dt.datetime, stale_seconds: float) -> Any:
    """A SELECT of the ids of runs known dead: ended, or silent past the limit."""
    heard = func.coalesce(RUNS.c.heartbeat_at, RUNS.c.started_at)
    return select(RUNS.c.id).where(
        or_(RUNS.c.ended_at.is_not(None), heard < now - dt.timedelta(seconds=stale_seconds))
    )
