"""How long a ledger method waits before a transient failure becomes the caller's: a minute for the
database, ten for this process's own pool of connections (back-pressure, not an outage)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import TimeoutError as PoolTimeout

from restore_flows.ledger.db import retried


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retries' clock, moved by the calls themselves; their pauses take no time."""
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    return now


def test_a_busy_pool_is_waited_for_past_the_database_s_minute(clock: list[float]) -> None:
    # A thousand stages in flight in one process on a loaded machine: two waits of the pool's 30 s
    # failed hosts that nothing was wrong with.
    calls: list[float] = []

    @retried
    def write() -> str:
        calls.append(clock[0])
        clock[0] += 30.0  # the pool's own wait for a connection
        if len(calls) < 6:
            raise PoolTimeout("QueuePool limit of size 10 overflow 10 reached")
        return "written"

    assert write() == "written"
    assert clock[0] == pytest.approx(180.0, abs=5)


def test_a_pool_never_free_fails_after_ten_minutes(clock: list[float]) -> None:
    @retried
    def write() -> None:
        clock[0] += 30.0
        raise PoolTimeout("QueuePool limit of size 10 overflow 10 reached")

    with pytest.raises(PoolTimeout):
        write()
    assert 600.0 <= clock[0] <= 640.0
