"""Host states and the one table of transitions between them.

Callers never assign a state: they send an event, and :func:`advance` looks the pair up in
``TRANSITIONS``. Anything not in the table raises :class:`IllegalTransition`. The ledger applies the
result; its safety rules (evidence, approvals, never re-wiping a clean host) sit on top of this table.

``docs/state-machine.md`` is rendered from this module (``python -m restore_flows.states``); a test
keeps the two in sync.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from restore_flows.errors import LedgerError
from restore_flows.inventory.models import Stage


class HostState(StrEnum):
    COMPROMISED = "compromised"
    """Every enrolled host starts here: assume it is encrypted and untrusted."""
    CAPTURING_EVIDENCE = "capturing_evidence"
    """A forensic image or memory dump is being taken before anything is changed."""
    EVIDENCE_CAPTURED = "evidence_captured"
    """Evidence is recorded (hash, location, custodian); the disk may now be wiped."""
    EVIDENCE_FAILED = "evidence_failed"
    WIPING = "wiping"
    """The disk is being erased."""
    WIPED = "wiped"
    """Erased; nothing of the encrypted system is left."""
    WIPE_FAILED = "wipe_failed"
    REIMAGING = "reimaging"
    """Installing the golden image (physical servers, workstations)."""
    RESTORING = "restoring"
    """Restoring a VM server from its last clean backup."""
    REIMAGED = "reimaged"
    """Rebuilt, by reimage or by backup restore; not yet trusted."""
    REIMAGE_FAILED = "reimage_failed"
    RESTORE_FAILED = "restore_failed"
    VERIFYING = "verifying"
    """Checks run: image id, services, EDR agent, IOC scan."""
    VERIFIED_CLEAN = "verified_clean"
    """Every check passed; still in the quarantine VLAN."""
    VERIFY_FAILED = "verify_failed"
    RELEASING = "releasing"
    """Moving from the quarantine VLAN to production."""
    RELEASE_FAILED = "release_failed"
    ONLINE = "online"
    """Back in service. The goal state."""
    QUARANTINED = "quarantined"
    """An indicator of compromise was found after rebuilding: isolated until an operator decides."""
    ON_HOLD = "on_hold"
    """Set aside by an operator (skipped or held); nothing is done to it until released."""


class Event(StrEnum):
    CAPTURE_EVIDENCE = "capture_evidence"
    EVIDENCE_CAPTURED = "evidence_captured"
    EVIDENCE_FAILED = "evidence_failed"
    START_WIPE = "start_wipe"
    WIPE_DONE = "wipe_done"
    WIPE_FAILED = "wipe_failed"
    START_REIMAGE = "start_reimage"
    REIMAGE_DONE = "reimage_done"
    REIMAGE_FAILED = "reimage_failed"
    START_RESTORE = "start_restore"
    RESTORE_DONE = "restore_done"
    RESTORE_FAILED = "restore_failed"
    START_VERIFY = "start_verify"
    VERIFY_PASSED = "verify_passed"
    VERIFY_FAILED = "verify_failed"
    IOC_FOUND = "ioc_found"
    START_RELEASE = "start_release"
    RELEASE_DONE = "release_done"
    RELEASE_FAILED = "release_failed"
    INTERRUPTED = "interrupted"
    RETRY = "retry"
    SKIP = "skip"
    HOLD = "hold"
    RELEASE_HOLD = "release_hold"
    RECOMPROMISE = "recompromise"
    ENROLL = "enroll"
    """Not in the table: the first log entry of a host, from no state to the initial state."""


S = HostState
E = Event
# The decisions 'restore decide' offers an operator.
_DECISIONS = frozenset({E.RETRY, E.SKIP, E.HOLD, E.RELEASE_HOLD, E.RECOMPROMISE})

# (state, event) -> next state. One line per transition, with why it exists.
TRANSITIONS: dict[tuple[HostState, Event], HostState] = {
    # Forensics first: evidence is taken by a driver, or registered by hand by the forensic team.
    (S.COMPROMISED, E.CAPTURE_EVIDENCE): S.CAPTURING_EVIDENCE,  # driver capture starts
    (S.CAPTURING_EVIDENCE, E.EVIDENCE_CAPTURED): S.EVIDENCE_CAPTURED,  # capture recorded
    (S.CAPTURING_EVIDENCE, E.EVIDENCE_FAILED): S.EVIDENCE_FAILED,  # capture failed: operator decides
    (S.COMPROMISED, E.EVIDENCE_CAPTURED): S.EVIDENCE_CAPTURED,  # evidence taken by hand, registered
    # Wiping: destructive, needs approval; forensic hold needs evidence (ledger rules).
    (S.COMPROMISED, E.START_WIPE): S.WIPING,  # no forensic hold: wipe straight away
    (S.EVIDENCE_CAPTURED, E.START_WIPE): S.WIPING,  # evidence is safe: wipe
    (S.WIPING, E.WIPE_DONE): S.WIPED,
    (S.WIPING, E.WIPE_FAILED): S.WIPE_FAILED,
    # Rebuilding: golden image for physical hosts and workstations, backup for VM servers.
    (S.WIPED, E.START_REIMAGE): S.REIMAGING,
    (S.REIMAGING, E.REIMAGE_DONE): S.REIMAGED,
    (S.REIMAGING, E.REIMAGE_FAILED): S.REIMAGE_FAILED,
    (S.WIPED, E.START_RESTORE): S.RESTORING,
    (S.RESTORING, E.RESTORE_DONE): S.REIMAGED,
    (S.RESTORING, E.RESTORE_FAILED): S.RESTORE_FAILED,
    # Verification: only a host that passes every check is clean; an IOC isolates it.
    (S.REIMAGED, E.START_VERIFY): S.VERIFYING,
    (S.VERIFYING, E.VERIFY_PASSED): S.VERIFIED_CLEAN,
    (S.VERIFYING, E.VERIFY_FAILED): S.VERIFY_FAILED,
    (S.VERIFYING, E.IOC_FOUND): S.QUARANTINED,
    # Release from the quarantine VLAN to production.
    (S.VERIFIED_CLEAN, E.START_RELEASE): S.RELEASING,
    (S.RELEASING, E.RELEASE_DONE): S.ONLINE,
    (S.RELEASING, E.RELEASE_FAILED): S.RELEASE_FAILED,
    # A stage that started and never finished (crash): resume found no proof it finished, so the
    # host waits for an operator in the stage's failed state instead of repeating the stage blindly.
    (S.CAPTURING_EVIDENCE, E.INTERRUPTED): S.EVIDENCE_FAILED,
    (S.WIPING, E.INTERRUPTED): S.WIPE_FAILED,
    (S.REIMAGING, E.INTERRUPTED): S.REIMAGE_FAILED,
    (S.RESTORING, E.INTERRUPTED): S.RESTORE_FAILED,
    (S.VERIFYING, E.INTERRUPTED): S.VERIFY_FAILED,
    (S.RELEASING, E.INTERRUPTED): S.RELEASE_FAILED,
    # Operator decisions on a failed stage: retry it from where it can start again...
    (S.EVIDENCE_FAILED, E.RETRY): S.COMPROMISED,
    (S.WIPE_FAILED, E.RETRY): S.COMPROMISED,  # a half-wiped disk is still untrusted
    (S.REIMAGE_FAILED, E.RETRY): S.WIPED,
    (S.RESTORE_FAILED, E.RETRY): S.WIPED,
    (S.VERIFY_FAILED, E.RETRY): S.REIMAGED,
    (S.RELEASE_FAILED, E.RETRY): S.VERIFIED_CLEAN,
    # ...or skip the host for now.
    (S.EVIDENCE_FAILED, E.SKIP): S.ON_HOLD,
    (S.WIPE_FAILED, E.SKIP): S.ON_HOLD,
    (S.REIMAGE_FAILED, E.SKIP): S.ON_HOLD,
    (S.RESTORE_FAILED, E.SKIP): S.ON_HOLD,
    (S.VERIFY_FAILED, E.SKIP): S.ON_HOLD,
    (S.RELEASE_FAILED, E.SKIP): S.ON_HOLD,
    # An explicit hold, from any state where no stage is running and the host is not yet clean.
    (S.COMPROMISED, E.HOLD): S.ON_HOLD,
    (S.EVIDENCE_CAPTURED, E.HOLD): S.ON_HOLD,
    (S.WIPED, E.HOLD): S.ON_HOLD,
    (S.REIMAGED, E.HOLD): S.ON_HOLD,
    (S.QUARANTINED, E.HOLD): S.ON_HOLD,
    # Released from hold, a host starts over: what happened to it meanwhile is unknown.
    (S.ON_HOLD, E.RELEASE_HOLD): S.COMPROMISED,
    # The only way back to wiping for a host that was clean: an operator says it is compromised
    # again, with a reason (ledger rule). Also how a quarantined host is sent round again.
    (S.VERIFIED_CLEAN, E.RECOMPROMISE): S.COMPROMISED,
    (S.ONLINE, E.RECOMPROMISE): S.COMPROMISED,
    (S.QUARANTINED, E.RECOMPROMISE): S.COMPROMISED,
    (S.VERIFY_FAILED, E.RECOMPROMISE): S.COMPROMISED,
    (S.RELEASE_FAILED, E.RECOMPROMISE): S.COMPROMISED,
}

INITIAL = S.COMPROMISED
FINAL = S.ONLINE


@dataclass(frozen=True, slots=True)
class StageRule:
    """One stage of a host's pipeline: the events and states it is made of, and what it may change."""

    stage: Stage
    start: Event
    done: Event
    fail: Event
    running: HostState
    """The state while the stage runs; a crash leaves the host here, and resume must resolve it."""
    failed: HostState
    finished: HostState
    """The state once it is done."""
    starts_from: tuple[HostState, ...]
    destructive: bool
    """It changes a disk for good: it needs an approval recorded for the run."""


# The stages in pipeline order. The pipeline, the ledger's rules and its attempt records, the docs and
# the tests read the stages from here; TRANSITIONS above is checked against it (tests/unit/test_states).
STAGES: tuple[StageRule, ...] = (
    StageRule(
        Stage.EVIDENCE,
        E.CAPTURE_EVIDENCE,
        E.EVIDENCE_CAPTURED,
        E.EVIDENCE_FAILED,
        S.CAPTURING_EVIDENCE,
        S.EVIDENCE_FAILED,
        S.EVIDENCE_CAPTURED,
        (S.COMPROMISED,),
        destructive=False,
    ),
    StageRule(
        Stage.WIPE,
        E.START_WIPE,
        E.WIPE_DONE,
        E.WIPE_FAILED,
        S.WIPING,
        S.WIPE_FAILED,
        S.WIPED,
        (S.COMPROMISED, S.EVIDENCE_CAPTURED),
        destructive=True,
    ),
    StageRule(
        Stage.REIMAGE,
        E.START_REIMAGE,
        E.REIMAGE_DONE,
        E.REIMAGE_FAILED,
        S.REIMAGING,
        S.REIMAGE_FAILED,
        S.REIMAGED,
        (S.WIPED,),
        destructive=True,
    ),
    StageRule(
        Stage.RESTORE,
        E.START_RESTORE,
        E.RESTORE_DONE,
        E.RESTORE_FAILED,
        S.RESTORING,
        S.RESTORE_FAILED,
        S.REIMAGED,
        (S.WIPED,),
        destructive=True,
    ),
    StageRule(
        Stage.VERIFY,
        E.START_VERIFY,
        E.VERIFY_PASSED,
        E.VERIFY_FAILED,
        S.VERIFYING,
        S.VERIFY_FAILED,
        S.VERIFIED_CLEAN,
        (S.REIMAGED,),
        destructive=False,
    ),
    StageRule(
        Stage.RELEASE,
        E.START_RELEASE,
        E.RELEASE_DONE,
        E.RELEASE_FAILED,
        S.RELEASING,
        S.RELEASE_FAILED,
        S.ONLINE,
        (S.VERIFIED_CLEAN,),
        destructive=False,
    ),
)
RULE: Mapping[Stage, StageRule] = {rule.stage: rule for rule in STAGES}
RUNNING_STAGE: Mapping[HostState, Stage] = {rule.running: rule.stage for rule in STAGES}
FAILED_STAGE: Mapping[HostState, Stage] = {rule.failed: rule.stage for rule in STAGES}
START_STAGE: Mapping[Event, Stage] = {rule.start: rule.stage for rule in STAGES}
# How an attempt of a stage ends, by the event that ends it.
OUTCOMES: Mapping[Event, str] = {
    **{rule.done: "succeeded" for rule in STAGES},
    **{rule.fail: "failed" for rule in STAGES},
    E.IOC_FOUND: "failed",
    E.INTERRUPTED: "interrupted",
}
STAGE_OF_STATE: Mapping[HostState, str] = {state: stage.value for state, stage in RUNNING_STAGE.items()}
IN_PROGRESS = frozenset(RUNNING_STAGE)
FAILED = frozenset(FAILED_STAGE)
DESTRUCTIVE = frozenset(rule.start for rule in STAGES if rule.destructive)
DESTRUCTIVE_STAGES = frozenset(rule.stage for rule in STAGES if rule.destructive)
# States after which the host must never be wiped again without a recompromise event.
CLEAN = frozenset({S.VERIFIED_CLEAN, S.RELEASING, S.RELEASE_FAILED, S.ONLINE})
# States in which nothing happens to a host until an operator decides.
STUCK = FAILED | {S.QUARANTINED, S.ON_HOLD}


class Sender(StrEnum):
    RUN = "run"
    """A restore run, holding the host's lease."""
    OPERATOR = "operator"
    """A named person, on a host no live run holds ('restore decide')."""


_BOTH = frozenset({Sender.RUN, Sender.OPERATOR})
_OPERATOR = frozenset({Sender.OPERATOR})
# Who may send each event. A run retries a failed stage on its own (within its attempts); everything
# else an operator decides is the operator's alone. Evidence is also registered by the forensic team.
SENDERS: Mapping[Event, frozenset[Sender]] = {
    **{event: frozenset({Sender.RUN}) for event in Event if event is not E.ENROLL},
    E.EVIDENCE_CAPTURED: _BOTH,
    E.RETRY: _BOTH,
    E.SKIP: _OPERATOR,
    E.HOLD: _OPERATOR,
    E.RELEASE_HOLD: _OPERATOR,
    E.RECOMPROMISE: _OPERATOR,
}
OPERATOR_EVENTS = frozenset(e for e, who in SENDERS.items() if Sender.OPERATOR in who and e in _DECISIONS)
OPERATOR_ONLY = frozenset(e for e, who in SENDERS.items() if who == _OPERATOR)
NEEDS_REASON = frozenset({E.RECOMPROMISE, E.HOLD, E.SKIP})


# --- Procedure steps (forest recovery, credential resets): work that is not one host's pipeline ---


class StepState(StrEnum):
    PENDING = "pending"
    """Not run yet, or re-armed by an operator: a run may start it once its needs are met."""
    RUNNING = "running"
    """A run started its command (or HTTP call)."""
    DONE = "done"
    """It ran and its check passed. It never runs again unless an operator re-arms it."""
    FAILED = "failed"
    """Its command ran (or may have) and failed, or its check did not pass: an operator decides."""
    INTERRUPTED = "interrupted"
    """The run died while it was running: it may have run. Only an operator can re-arm it."""


class StepEvent(StrEnum):
    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    NOT_STARTED = "not_started"
    INTERRUPT = "interrupt"
    RETRY = "retry"
    REARM = "rearm"
    DONE_BY_HAND = "done_by_hand"


P = StepState
V = StepEvent
# (state, event) -> next state for procedure steps. A credential reset is not idempotent (two krbtgt
# resets minutes apart break every Kerberos ticket of the estate): whatever may have run goes to an
# operator, never back to pending by itself.
STEP_TRANSITIONS: dict[tuple[StepState, StepEvent], StepState] = {
    (P.PENDING, V.START): P.RUNNING,
    (P.RUNNING, V.SUCCEED): P.DONE,  # the command ended well and the check passed
    (P.RUNNING, V.FAIL): P.FAILED,  # it ran and failed, or its check failed
    # The command never reached the target (no connection, refused login): nothing ran, try again.
    (P.RUNNING, V.NOT_STARTED): P.PENDING,
    # Its run died while it ran: found by the next run, never repeated blindly.
    (P.RUNNING, V.INTERRUPT): P.INTERRUPTED,
    # A step the inventory declares repeatable (a check-only or idempotent step) may be run again by
    # a run after a failure or interruption (ledger rule).
    (P.FAILED, V.RETRY): P.PENDING,
    (P.INTERRUPTED, V.RETRY): P.PENDING,
    # An operator re-arms a step, with a reason: it will run again.
    (P.DONE, V.REARM): P.PENDING,
    (P.FAILED, V.REARM): P.PENDING,
    (P.INTERRUPTED, V.REARM): P.PENDING,
    # ...or records that it was done by hand (the reset was run from a console), with a reason.
    (P.PENDING, V.DONE_BY_HAND): P.DONE,
    (P.FAILED, V.DONE_BY_HAND): P.DONE,
    (P.INTERRUPTED, V.DONE_BY_HAND): P.DONE,
}
STEP_INITIAL = P.PENDING
STEP_OPERATOR_EVENTS = frozenset({V.REARM, V.DONE_BY_HAND})
"""Sent by a named person with a reason ('restore decide rearm|done_by_hand STEP')."""
STEP_STUCK = frozenset({P.FAILED, P.INTERRUPTED})
"""Nothing more happens to the step until an operator decides (or a run retries a repeatable one)."""


def advance_step(state: StepState, event: StepEvent) -> StepState:
    try:
        return STEP_TRANSITIONS[(state, event)]
    except KeyError:
        allowed = sorted(e.value for (s, e) in STEP_TRANSITIONS if s is state)
        raise LedgerError(
            f"step event '{event.value}' is not allowed in state '{state.value}'"
            + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        ) from None


class IllegalTransition(LedgerError, ValueError):
    def __init__(self, state: HostState, event: Event) -> None:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s is state)
        super().__init__(
            f"event '{event.value}' is not allowed in state '{state.value}'"
            + (f" (allowed: {', '.join(allowed)})" if allowed else " (no event is allowed)")
        )
        self.state = state
        self.event = event


def advance(state: HostState, event: Event) -> HostState:
    """The state after ``event``; raises ``IllegalTransition`` if the table has no such move."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def render_markdown() -> str:
    """The state machine as a Markdown document (docs/state-machine.md)."""
    lines = [
        "# Host state machine",
        "",
        "Generated from `restore_flows/states.py` by `python -m restore_flows.states`; do not edit",
        "by hand (a test fails when the two differ).",
        "",
        f"Initial state: `{INITIAL.value}`. Final state: `{FINAL.value}`.",
        "",
        "## States",
        "",
        "| state | meaning |",
        "| --- | --- |",
    ]
    for state in HostState:
        doc = " ".join((_doc_of(state) or "").split())
        lines.append(f"| `{state.value}` | {doc} |")
    lines += [
        "",
        "## Transitions",
        "",
        "| from | event | to |",
        "| --- | --- | --- |",
    ]
    for (state, event), target in TRANSITIONS.items():
        lines.append(f"| `{state.value}` | `{event.value}` | `{target.value}` |")
    lines += [
        "",
        "## Stages",
        "",
        "| stage | starts from | start | running | done | finished | fail | failed | destructive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rule in STAGES:
        sources = ", ".join(f"`{s.value}`" for s in rule.starts_from)
        lines.append(
            f"| {rule.stage.value} | {sources} | `{rule.start.value}` | `{rule.running.value}` | "
            f"`{rule.done.value}` | `{rule.finished.value}` | `{rule.fail.value}` | `{rule.failed.value}` | "
            f"{'yes' if rule.destructive else 'no'} |"
        )
    lines += [
        "",
        "## Who sends each event",
        "",
        "| event | run | operator |",
        "| --- | --- | --- |",
    ]
    for event in Event:
        if event in SENDERS:
            who = SENDERS[event]
            lines.append(
                f"| `{event.value}` | {'yes' if Sender.RUN in who else ''} | "
                f"{'yes' if Sender.OPERATOR in who else ''} |"
            )
    lines += [
        "",
        "## Rules the ledger adds",
        "",
        "- Events that need an approval recorded for the run: "
        + ", ".join(f"`{e.value}`" for e in sorted(DESTRUCTIVE)),
        "- A host under forensic hold cannot `start_wipe` without an evidence record.",
        "- A host that was ever verified clean cannot `start_wipe` again until an operator sends "
        "`recompromise` with a reason.",
        "- Operator events ("
        + ", ".join(f"`{e.value}`" for e in sorted(OPERATOR_EVENTS))
        + ") record who sent them; "
        + ", ".join(f"`{e.value}`" for e in sorted(NEEDS_REASON))
        + " need a reason.",
        "",
        "```mermaid",
        "stateDiagram-v2",
        f"    [*] --> {INITIAL.value}",
    ]
    for (state, event), target in TRANSITIONS.items():
        lines.append(f"    {state.value} --> {target.value}: {event.value}")
    lines += [f"    {FINAL.value} --> [*]", "```", ""]
    lines += [
        "## Procedure steps",
        "",
        "Steps of the inventory's `procedures:` (forest recovery, credential resets) have a state",
        "machine of their own: whatever may have run is never started again without an operator.",
        "",
        "| state | meaning |",
        "| --- | --- |",
    ]
    docs = _member_docs(StepState)
    for step_state in StepState:
        lines.append(f"| `{step_state.value}` | {' '.join(docs.get(step_state.name, '').split())} |")
    lines += ["", "| from | event | to |", "| --- | --- | --- |"]
    for (step_state, step_event), step_target in STEP_TRANSITIONS.items():
        lines.append(f"| `{step_state.value}` | `{step_event.value}` | `{step_target.value}` |")
    lines += [
        "",
        "- Operator events ("
        + ", ".join(f"`{e.value}`" for e in sorted(STEP_OPERATOR_EVENTS))
        + ") need a name and a reason; `retry` is sent by a run only for a step declared `repeatable`.",
        "",
    ]
    return "\n".join(lines)


def _doc_of(state: HostState) -> str | None:
    return _state_docs().get(state)


def _member_docs(enum: type[StrEnum]) -> dict[str, str]:
    """Member docstrings by member name, read from the source (enums keep no per-member docstring)."""
    tree = ast.parse(inspect.getsource(enum))
    docs: dict[str, str] = {}
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    for current, following in itertools.pairwise(body):
        if (
            isinstance(current, ast.Assign)
            and isinstance(current.targets[0], ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[current.targets[0].id] = following.value.value
    return docs


@functools.cache
def _state_docs() -> dict[HostState, str]:
    docs = {HostState[name]: doc for name, doc in _member_docs(HostState).items()}
    for state in FAILED:
        docs.setdefault(state, "The stage failed: an operator decides to `retry` or `skip`.")
    return docs


if __name__ == "__main__":
    print(render_markdown(), end="")
