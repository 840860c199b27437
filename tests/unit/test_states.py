"""The state machine table: every legal move works, every other raises, the docs match."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from restore_flows.inventory.models import Stage
from restore_flows.states import (
    FAILED,
    FINAL,
    INITIAL,
    OPERATOR_EVENTS,
    OPERATOR_ONLY,
    SENDERS,
    STAGE_OF_STATE,
    STAGES,
    TRANSITIONS,
    Event,
    HostState,
    IllegalTransition,
    Sender,
    advance,
    render_markdown,
)

ROOT = Path(__file__).resolve().parents[2]
ILLEGAL = [
    (state, event)
    for state, event in itertools.product(HostState, Event)
    if (state, event) not in TRANSITIONS
]


@pytest.mark.parametrize(("state", "event"), list(TRANSITIONS), ids=str)
def test_every_legal_transition(state: HostState, event: Event) -> None:
    assert advance(state, event) is TRANSITIONS[(state, event)]


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=str)
def test_every_illegal_transition_raises(state: HostState, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"'{event.value}' is not allowed in state '{state.value}'"):
        advance(state, event)


def test_every_state_is_reachable_and_can_reach_online() -> None:
    reachable = {INITIAL}
    frontier = [INITIAL]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(HostState)
    for state in HostState:
        seen = {state}
        frontier = [state]
        while frontier:
            current = frontier.pop()
            for (source, _), target in TRANSITIONS.items():
                if source is current and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert FINAL in seen or state is FINAL, state


def test_failed_states_wait_for_an_operator() -> None:
    for state in FAILED:
        assert (state, Event.RETRY) in TRANSITIONS, state
        assert (state, Event.SKIP) in TRANSITIONS, state


def test_running_stages_resolve_only_by_outcome_or_interruption() -> None:
    # A running stage cannot be started again, held or retried: a crash must be resolved.
    for state in STAGE_OF_STATE:
        events = {event for (source, event) in TRANSITIONS if source is state}
        assert Event.INTERRUPTED in events
        assert not events & {Event.RETRY, Event.HOLD, Event.SKIP, Event.START_WIPE}


def test_wiping_starts_only_from_untrusted_states() -> None:
    sources = {state for (state, event) in TRANSITIONS if event is Event.START_WIPE}
    assert sources == {HostState.COMPROMISED, HostState.EVIDENCE_CAPTURED}


def test_docs_are_rendered_from_the_table() -> None:
    committed = (ROOT / "docs" / "state-machine.md").read_text()
    assert committed == render_markdown(), "run: python -m restore_flows.states > docs/state-machine.md"


def test_the_stage_table_agrees_with_the_transitions() -> None:
    for rule in STAGES:
        for source in rule.starts_from:
            assert TRANSITIONS[(source, rule.start)] is rule.running, rule.stage
        assert TRANSITIONS[(rule.running, rule.done)] is rule.finished, rule.stage
        assert TRANSITIONS[(rule.running, rule.fail)] is rule.failed, rule.stage
        assert TRANSITIONS[(rule.running, Event.INTERRUPTED)] is rule.failed, rule.stage
        # A retry goes back to where the stage can start again.
        assert TRANSITIONS[(rule.failed, Event.RETRY)] in rule.starts_from, rule.stage
    starts = {event for (_, event) in TRANSITIONS if event.value.startswith(("start_", "capture_"))}
    assert starts == {rule.start for rule in STAGES}
    assert {rule.stage for rule in STAGES if rule.destructive} == {Stage.WIPE, Stage.REIMAGE, Stage.RESTORE}


def test_who_may_send_each_event_is_one_table() -> None:
    assert OPERATOR_ONLY <= OPERATOR_EVENTS
    assert Event.RETRY in OPERATOR_EVENTS - OPERATOR_ONLY  # a run retries on its own, an operator too
    assert all(Sender.RUN not in SENDERS[e] for e in OPERATOR_ONLY)
    assert set(SENDERS) == set(Event) - {Event.ENROLL}
