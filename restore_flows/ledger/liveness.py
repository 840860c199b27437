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
from pathlib import Path
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
    return not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """The process is there and has not ended. One that has ended but was never reaped (a zombie,
    for ever where init reaps nothing, as in some containers) has ended, though ``kill(pid, 0)``
    still finds it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: there
        pass
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return fields is None or fields[0] not in _ENDED  # no /proc to ask: the signal said it is there


def group_alive(pgid: int) -> bool:
    """A process of the group ``pgid`` has not ended (its leader, or any member still running)."""
    if process_alive(pgid):
        return True
    try:
        stats = [entry / "stat" for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return False  # no /proc: the leader is all that can be seen
    return any(
        fields is not None and fields[0] not in _ENDED and fields[2] == str(pgid)
        for fields in map(_stat, stats)
    )


_ENDED = ("Z", "X")  # zombie, dead


def _stat(path: Path) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command's name: state, ppid, pgrp, ..."""
    try:
        return path.read_text().rpartition(")")[2].split() or None
    except OSError:
        return None  # ended while looking, or no /proc


def dead_runs(now: dt.datetime, stale_seconds: float) -> Any:
    """A SELECT of the ids of runs known dead: ended, or silent past the limit."""
    heard = func.coalesce(RUNS.c.heartbeat_at, RUNS.c.started_at)
    return select(RUNS.c.id).where(
        or_(RUNS.c.ended_at.is_not(None), heard < now - dt.timedelta(seconds=stale_seconds))
    )
