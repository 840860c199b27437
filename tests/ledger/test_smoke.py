from __future__ import annotations

from restore_flows.ledger.repository import Ledger
from restore_flows.states import HostState


def test_sample_enrolled_compromised(ledger: Ledger) -> None:
    hosts = ledger.hosts()
    assert len(hosts) == 1700
    assert {h.state for h in hosts} == {HostState.COMPROMISED}
