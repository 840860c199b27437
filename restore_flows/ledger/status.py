"""Progress of the estate from the ledger's host records: pure arithmetic, no I/O."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from restore_flows.ledger.records import History, HostRecord, StepHistory
from restore_flows.states import FAILED, FINAL, HostState

DIMENSIONS = ("wave", "site", "department", "kind")


def bucket(state: HostState) -> str:
    """The coarse progress bucket managers read: online, in progress, failed, waiting."""
    if state is FINAL:
        return "online"
    if state in FAILED or state in (HostState.QUARANTINED, HostState.ON_HOLD):
        return "failed"
    return "waiting" if state is HostState.COMPROMISED else "in_progress"


def _group(hosts: Iterable[HostRecord], dimension: str, order: Sequence[str] = ()) -> dict[str, Any]:
    states: dict[str, Counter[str]] = {}
    for host in hosts:
        states.setdefault(getattr(host, dimension), Counter())[host.state.value] += 1
    keys = [k for k in order if k in states] + sorted(k for k in states if k not in order)
    out: dict[str, Any] = {}
    for key in keys:
        counts = states[key]
        total = sum(counts.values())
        online = counts.get(FINAL.value, 0)
        out[key] = {
            "total": total,
            "online": online,
            "percent": round(100.0 * online / total, 1) if total else 0.0,
            "states": dict(sorted(counts.items())),
        }
    return out


def status_report(
    hosts: Sequence[HostRecord],
    wave_order: Sequence[str],
    etas: Mapping[str, float | None] | None = None,
) -> dict[str, Any]:
    """``restore status --json``: every host's state, and counts per wave, site, department, kind.

    ``etas``: minutes until each wave is back, from the forecast (:mod:`restore_flows.execution.eta`);
    None for a wave that will not finish without an operator.
    """
    total = len(hosts)
    online = sum(1 for h in hosts if h.state is FINAL)
    waves = _group(hosts, "wave", wave_order)
    for name, group in waves.items():
        group["eta_minutes"] = None if etas is None else etas.get(name)
    return {
        "estate": {
            "total": total,
            "online": online,
            "percent": round(100.0 * online / total, 1) if total else 0.0,
            "buckets": dict(sorted(Counter(bucket(h.state) for h in hosts).items())),
        },
        "hosts": {
            h.name: {
                "state": h.state.value,
                "wave": h.wave,
                "site": h.site,
                "department": h.department,
                "kind": h.kind,
                "role": h.role,
            }
            for h in hosts
        },
        "waves": waves,
        "sites": _group(hosts, "site"),
        "departments": _group(hosts, "department"),
        "kinds": _group(hosts, "kind"),
    }


def iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value is not None else None


def history_report(history: History) -> dict[str, Any]:
    """``restore history HOST --json``."""
    host = history.host
    return {
        "host": host.name,
        "state": host.state.value,
        "wave": host.wave,
        "site": host.site,
        "kind": host.kind,
        "role": host.role,
        "forensic_hold": host.forensic_hold,
        "retired": host.retired,
        "lease": {"run": host.lease_run, "expires": iso(host.lease_expires)} if host.lease_run else None,
        "transitions": [
            {
                "from": t.from_state.value if t.from_state else None,
                "event": t.event,
                "to": t.to_state.value,
                "run": t.run_id,
                "actor": t.actor,
                "at": iso(t.at),
                "detail": t.detail,
            }
            for t in history.transitions
        ],
        "attempts": [
            {
                "stage": a.stage,
                "number": a.number,
                "run": a.run_id,
                "started": iso(a.started_at),
                "ended": iso(a.ended_at),
                "outcome": a.outcome,
                "error": a.error,
                "executed_by": a.executed_by,
            }
            for a in history.attempts
        ],
        "evidence": [
            {
                "kind": e.kind,
                "sha256": e.sha256,
                "location": e.location,
                "custodian": e.custodian,
                "at": iso(e.recorded_at),
                "run": e.run_id,
            }
            for e in history.evidence
        ],
        "approvals": [
            {
                "run": a.run_id,
                "scope": a.scope,
                "approver": a.approver,
                "at": iso(a.approved_at),
                "automatic": a.automatic,
                "shown": a.shown,
            }
            for a in history.approvals
        ],
    }


def step_history_report(history: StepHistory) -> dict[str, Any]:
    """``restore history STEP --json``: its states, who approved it, what it rotated (fingerprints)."""
    step = history.step
    return {
        "step": step.name,
        "state": step.state.value,
        "attempts": step.attempts,
        "run": step.run_id,
        "started": iso(step.started_at),
        "finished": iso(step.finished_at),
        "error": step.error,
        "retired": step.retired,
        "log": [
            {
                "at": iso(entry.at),
                "from": entry.from_state.value if entry.from_state else None,
                "event": entry.event,
                "to": entry.to_state.value,
                "attempt": entry.attempt,
                "run": entry.run_id,
                "actor": entry.actor,
                "output_sha256": entry.output_sha256,
                "detail": entry.detail,
            }
            for entry in history.log
        ],
        "approvals": [
            {"approver": a.approver, "at": iso(a.approved_at), "run": a.run_id, "automatic": a.automatic}
            for a in history.approvals
        ],
        "rotations": [
            {
                "secret": r.secret,
                "fingerprint": r.fingerprint,
                "at": iso(r.at),
                "run": r.run_id,
                "actor": r.actor,
            }
            for r in history.rotations
        ],
    }
